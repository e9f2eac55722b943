"""CLIP-Adapter (Gao et al., IJCV 2023): a residual bottleneck MLP on CLIP's frozen image feature.

As the reference (gaopengcuhk/CLIP-Adapter clip_adapter.py), the visual adapter only:

    A(f) = ReLU(W2 ReLU(W1 f)),  W1: D -> D / 4, W2: D / 4 -> D, no biases,
    x = ratio * A(f) + (1 - ratio) * f,  ratio = 0.2,

on the (unnormalized) image feature f, then CLIP's cosine logits against the frozen zero-shot class
features of the hand-crafted templates. Both towers stay frozen and run without autograd; only the
adapter trains: 2 x 512 x 128 = 131,072 parameters at ViT-B/16 (D = 512).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from vlm_adapt.backbones import Backbone
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.registry import register_method

log = logging.getLogger(__name__)


@register_method("clip_adapter")
class CLIPAdapter(CLIPMethod):

    def __init__(self, backbone: Backbone, ratio: float = 0.2, reduction: int = 4, **kwargs: Any):
        """`ratio`: weight of the adapted feature in the residual mix (0.2 in the reference);
        `reduction`: bottleneck width = D / reduction (4)."""
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"method.module.ratio mixes the adapter's feature in: pick it in [0, 1], got {ratio}")
        super().__init__(backbone, **kwargs)
        dim = int(self.clip.visual.output_dim)
        if reduction < 1 or dim % reduction:
            raise ConfigError(f"method.module.reduction={reduction} must divide the image feature width {dim}")
        self.ratio = float(ratio)
        self.adapter = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.ReLU(),
        )
        log.info("CLIP-Adapter trains %s parameters (bottleneck %d -> %d -> %d, ratio %.2f)",
                 f"{sum(p.numel() for p in self.adapter.parameters()):,}", dim, dim // reduction, dim, ratio)

    def encode_images(self, images: Tensor, index: Tensor | None = None) -> Tensor:
        """Frozen CLIP image features (no autograd) mixed with the adapter's output."""
        features = super().encode_images(images, index)
        return self.ratio * self.adapter(features) + (1.0 - self.ratio) * features
