"""Regularisers shared by methods.

`TextFeatureAnchor` keeps learned class text features near fixed reference ones t0: it stores t0 for the
training label space once and gives 1 - mean_c cos(t_c, t0_c). CLIPFit anchors to the untrained model's
class features, KgCoOp to the hand-crafted prompt's (CLIP zero-shot) features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_adapt.data.label_space import LabelSpace


class TextFeatureAnchor(nn.Module):
    """t0: reference class text features of one label space, and the distance 1 - mean cos to them.

    The features are a non-persistent buffer: they move with the module's device, never enter a
    checkpoint, and are recomputed (from the frozen parts they come from) in every process.
    """

    features: Tensor | None

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("features", None, persistent=False)
        self.space: LabelSpace | None = None

    def forget(self) -> None:
        """Drop t0 (the next `store` encodes again)."""
        self.features = None
        self.space = None

    def keep_only(self, space: LabelSpace | None) -> None:
        """Drop t0 unless it belongs to `space` (a new training label space needs its own)."""
        if space is None or space != self.space:
            self.forget()

    @torch.no_grad()
    def store(self, space: LabelSpace, encode: Callable[[LabelSpace], Tensor]) -> Tensor:
        """t0 = encode(space), computed once per label space (a stored space is kept as it is)."""
        if self.features is None or space != self.space:
            self.features = encode(space).detach()
            self.space = space
        return self.features

    def distance(self, text_features: Tensor) -> Tensor:
        """1 - mean over classes of cos(t_c, t0_c); row c of `text_features` is class c of t0's space."""
        if self.features is None:
            raise RuntimeError("the text-feature anchor t0 is unset: store() it for the training label space first")
        if text_features.shape != self.features.shape:
            raise ValueError(f"text features {tuple(text_features.shape)} do not match the anchor's "
                             f"{tuple(self.features.shape)} (one row per class of the training label space)")
        reference = self.features.to(text_features.dtype)
        return 1.0 - F.cosine_similarity(text_features, reference, dim=-1).mean()
