"""CLIPFit (Li et al., EMNLP 2024): fine-tune only a few bias and LayerNorm terms of CLIP.

Trainable: the bias of the second FFN linear (`mlp.c_proj.bias`) of every text resblock, and the
weight and bias of every image-tower LayerNorm (`ln_pre`, `ln_1`/`ln_2` of each resblock,
`ln_post`): 12 x 512 + 26 x 2 x 768 = 46,080 parameters at ViT-B/16. The loss adds a term that keeps
each class's text feature near its zero-shot feature: CE + lambda * (1 - mean_c cos(t_c, t0_c)).
"""

from __future__ import annotations

import logging
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from vlm_adapt.backbones import Backbone
from vlm_adapt.backbones.loading import count_parameters
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.registry import register_method
from vlm_adapt.methods.regularizers import TextFeatureAnchor

log = logging.getLogger(__name__)


@register_method("clipfit")
class CLIPFit(CLIPMethod):

    def __init__(self, backbone: Backbone, reg_weight: float = 8.0, **kwargs: Any):
        """`reg_weight`: lambda of the text-feature regulariser (8 for base-to-new, 2 or 8 few-shot)."""
        super().__init__(backbone, **kwargs)
        # t0: frozen zero-shot features of the training label space, stored by `setup("fit")`
        self.text_anchor = TextFeatureAnchor()
        trainable, _ = count_parameters(self)
        log.info("CLIPFit trains %s parameters (text c_proj biases + image LayerNorms)", f"{trainable:,}")

    def select_trainable(self) -> None:
        for block in self.clip.transformer.resblocks:
            block.mlp.c_proj.bias.requires_grad_(True)
        for module in self.clip.visual.modules():
            if isinstance(module, nn.LayerNorm):  # open_clip's LayerNorm classes subclass nn.LayerNorm
                module.requires_grad_(True)

    @property
    def zero_shot_text_features(self) -> Tensor | None:
        """t0, (C, D) normalized, or None before `setup("fit")`."""
        return self.text_anchor.features

    def on_label_spaces_attached(self) -> None:
        self.text_anchor.keep_only(self.train_label_space)  # t0 belongs to one training label space

    def setup(self, stage: str) -> None:
        # Lightning calls setup before restoring a checkpoint, so t0 comes from the untrained backbone
        # even when a run resumes.
        super().setup(stage)
        if stage == "fit" and self.zero_shot_text_features is None:
            self.store_zero_shot_text_features()

    def store_zero_shot_text_features(self) -> None:
        """Encode the training label space once with the current (zero-shot) weights: t0."""
        if self.train_label_space is None:
            raise RuntimeError("call attach_label_spaces(train, test) before computing CLIPFit's t0")
        self.text_anchor.forget()  # an explicit call encodes again, with the weights as they are now
        self.text_anchor.store(self.train_label_space, self.encode_label_space)

    def text_regulariser(self, text_features: Tensor) -> Tensor:
        """1 - mean over classes of cos(t_c, t0_c); both are normalized, so cos is a dot product."""
        if self.zero_shot_text_features is None:
            raise RuntimeError("CLIPFit's t0 is unset: call setup('fit') or store_zero_shot_text_features()")
        return self.text_anchor.distance(text_features)

    def training_loss(self, logits: Tensor, labels: Tensor, text_features: Tensor) -> Tensor:
        regulariser = self.text_regulariser(text_features)
        self.log("train/text_reg", regulariser, batch_size=len(labels))
        return F.cross_entropy(logits, labels) + self.hparams.reg_weight * regulariser
