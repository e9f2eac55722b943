"""KgCoOp (Yao et al., CVPR 2023): CoOp whose class text features are kept near the hand-crafted prompt's.

The prompt is CoOp's, [SOS] ctx_1 .. ctx_M <class name tokens> . [EOT], with M = 4 context vectors
initialised from "a photo of a" (4 x 512 = 2,048 trainable at ViT-B/16); everything of CLIP stays frozen.
The loss adds the knowledge-guided term of the reference code (htyao89/KgCoOp trainers/kgcoop.py):

    L = CE + w * (1 - mean_c cos(t_c, t0_c)),   w = 8,

where t_c is class c's text feature from the learned prompt and t0_c CLIP's zero-shot feature of the
hand-crafted prompt (the label space's templates, e.g. "a photo of a {}."), computed once for the training
classes. The paper writes the term as the mean squared Euclidean distance; on unit vectors that is
2 (1 - cos), so the code's w = 8 is the paper's lambda = 4 (docs/FIDELITY.md).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from vlm_adapt.backbones import Backbone
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.coop import CoOp
from vlm_adapt.methods.registry import register_method
from vlm_adapt.methods.regularizers import TextFeatureAnchor


@register_method("kgcoop")
class KgCoOp(CoOp):

    def __init__(
        self,
        backbone: Backbone,
        reg_weight: float = 8.0,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        ctx_init_length: str = "words",
        **kwargs: Any,
    ):
        """`reg_weight`: w of the knowledge-guided term (the reference's TRAINER.COOP.W, 8.0). The other
        options are CoOp's; the defaults are the reference's context ("a photo of a", its word count)."""
        super().__init__(backbone, n_ctx=n_ctx, ctx_init=ctx_init, ctx_init_length=ctx_init_length, **kwargs)
        self.reg_weight = float(reg_weight)
        # t0: the hand-crafted prompts' text features of the training label space, stored by `setup("fit")`
        self.text_anchor = TextFeatureAnchor()

    def zero_shot_label_space(self, space: LabelSpace) -> Tensor:
        """(C, D) normalized CLIP zero-shot class features of `space`'s hand-crafted templates."""
        return CLIPMethod.encode_label_space(self, space)

    def on_label_spaces_attached(self) -> None:
        super().on_label_spaces_attached()
        self.text_anchor.keep_only(self.train_label_space)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.store_hand_crafted_text_features()

    def store_hand_crafted_text_features(self) -> Tensor:
        """t0 for the training label space (once; the frozen text tower gives the same features any time)."""
        if self.train_label_space is None:
            raise RuntimeError("call attach_label_spaces(train, test) before computing KgCoOp's t0")
        return self.text_anchor.store(self.train_label_space, self.zero_shot_label_space)

    def knowledge_guided_loss(self, text_features: Tensor) -> Tensor:
        """1 - mean over the training classes of cos(t_c, t0_c)."""
        return self.text_anchor.distance(text_features)

    def training_loss(self, logits: Tensor, labels: Tensor, text_features: Tensor) -> Tensor:
        regulariser = self.knowledge_guided_loss(text_features)
        self.log("train/text_reg", regulariser, batch_size=len(labels))
        return F.cross_entropy(logits, labels) + self.reg_weight * regulariser
