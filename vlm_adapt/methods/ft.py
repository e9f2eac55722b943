"""Full fine-tuning: every parameter of both towers trains (embeddings included); logit_scale stays frozen."""

from __future__ import annotations

from vlm_adapt.methods.base import CLIPMethod


class FullFineTuning(CLIPMethod):
    method_name = "ft"
    supports_retrieval = True

    def select_trainable(self) -> None:
        self.clip.requires_grad_(True)
        self.clip.logit_scale.requires_grad_(False)
