"""CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024): low-rank updates of the attention projections of both towers.

As the reference (MaxZanella/CLIP-LoRA, loralib/utils.py `apply_lora`, loralib/layers.py, lora.py
`run_lora`, run_utils.py defaults): LoRA of rank r = 2 on q, k and v of every resblock of the text and
the vision tower, alpha = 1, scaled by alpha / sqrt(r), dropout 0.25 on the LoRA branch's input during
training; A Kaiming-uniform, B zero, so training starts at zero-shot CLIP. Only A and B train:
12 x 3 x (2 x 768 + 768 x 2) + 12 x 3 x (2 x 512 + 512 x 2) = 184,320 parameters at ViT-B/16. Each
step re-encodes the class prompts through the adapted text tower; the logits use the reference's fixed
scale 100 (`logit_scale`; null: CLIP's own). The layer itself is `vlm_adapt/backbones/lora.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from vlm_adapt.backbones import Backbone
from vlm_adapt.backbones.lora import inject_lora, lora_modules
from vlm_adapt.backbones.towers import normalize
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.registry import register_method

log = logging.getLogger(__name__)


@register_method("clip_lora")
class CLIPLoRA(CLIPMethod):

    def __init__(
        self,
        backbone: Backbone,
        encoder: str = "both",
        position: str = "all",
        params: Sequence[str] = ("q", "k", "v"),
        r: int = 2,
        alpha: float = 1.0,
        dropout: float = 0.25,
        logit_scale: float | None = 100.0,
        **kwargs: Any,
    ):
        """`encoder`: text, vision or both towers; `position`: which blocks (all, bottom, mid, up, half-up,
        half-bottom, top3); `params`: projections among q, k, v, o; `r`, `alpha`, `dropout`: rank, scale
        (alpha / sqrt(r)) and dropout rate on the LoRA input; `logit_scale`: the fixed logit scale (the
        reference's 100) or null for CLIP's learned one. Defaults: the reference's (run_utils.py)."""
        if logit_scale is not None and not logit_scale > 0:
            raise ConfigError(f"method.module.logit_scale={logit_scale!r}: a positive scale, or null for CLIP's own")
        # wrapped (options checked there) before the base class freezes the backbone and calls select_trainable
        inject_lora(backbone.model, encoder=encoder, position=position, params=params, r=r, alpha=alpha,
                    dropout=dropout)
        super().__init__(backbone, **kwargs)
        layers = lora_modules(self.clip)
        log.info("CLIP-LoRA trains %s parameters (rank %d on %s of %d attention layers, %s)",
                 f"{sum(p.numel() for p in self.parameters() if p.requires_grad):,}", r, ", ".join(params),
                 len(layers), encoder)

    def select_trainable(self) -> None:
        for layer in lora_modules(self.clip):
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        scale = self.hparams.logit_scale
        if scale is None:
            return super().logits(image_features, text_features)
        return scale * normalize(image_features) @ text_features.t()
