"""Zero-shot CLIP: no training; optionally an ensemble of templates (mean of normalized features)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from vlm_adapt.backbones import Backbone
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.registry import CLASSIFICATION, RETRIEVAL, register_method


@register_method("zero_shot", tasks=(CLASSIFICATION, RETRIEVAL), fit="none")
class ZeroShot(CLIPMethod):

    def __init__(self, backbone: Backbone, templates: list[str] | None = None, **kwargs: Any):
        """`templates`: prompt templates to ensemble instead of each dataset's own."""
        super().__init__(backbone, **kwargs)

    def encode_label_space(self, space: LabelSpace) -> Tensor:
        return super().encode_label_space(space.with_templates(self.hparams.templates))
