"""IVLP: independent vision-language deep prompts (the baseline of MaPLe, CVPR 2023, and PromptSRC, ICCV 2023).

Text: "<ctx_init> <class>." with its first M_t tokens after [SOS] the learned context (2 from "a photo of
a"), and before each text block j = 1 .. J_t-1 those positions replaced by block j's own prompts.
Vision: VPT-deep, M_v tokens appended before ln_pre and replaced before each vision block j = 1 .. J_v-1.
The two towers' prompts are independent (MaPLe couples them). Trainable at ViT-B/16 (M = 2, J = 12 in
both towers): 12 x 2 x 512 + 12 x 2 x 768 = 12,288 + 18,432 = 30,720.

As the reference (muzairkhattak/multimodal-prompt-learning trainers/independentVL.py, clip/model.py
ResidualAttentionBlock_IVLP): deep prompts N(0, 0.02), the context from words only when M_t <= 4.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vlm_adapt.backbones import Backbone
from vlm_adapt.backbones.towers import BlockEdits
from vlm_adapt.methods.deep_prompts import (
    LeadingContextPrompts,
    check_prompts,
    context_from_words,
    new_prompts,
    text_prompt_edits,
)
from vlm_adapt.methods.registry import register_method
from vlm_adapt.methods.vpt import VisualPrompts


@register_method("ivlp")
class IVLP(LeadingContextPrompts, VisualPrompts):

    def __init__(self, backbone: Backbone, n_ctx_text: int = 2, n_ctx_vision: int = 2,
                 prompt_depth_text: int = 12, prompt_depth_vision: int = 12,
                 ctx_init: str | None = "a photo of a", **kwargs: Any):
        """`n_ctx_text` / `n_ctx_vision`: prompt tokens per block of each tower; `prompt_depth_*`: the blocks
        with prompts (input included); `ctx_init`: the prompt's words, whose first n_ctx_text tokens the
        context replaces and starts from (null: placeholder words, N(0, 0.02))."""
        super().__init__(backbone, n_ctx_vision=n_ctx_vision, prompt_depth_vision=prompt_depth_vision, **kwargs)
        check_prompts(n_ctx_text, prompt_depth_text, self.towers.num_text_layers, "n_ctx_text", "prompt_depth_text")
        init, self.prompt_prefix = context_from_words(self.towers, self.tokenizer, ctx_init, n_ctx_text)
        self.n_ctx = n_ctx_text
        self.prompt_depth_text = prompt_depth_text
        self.ctx = nn.Parameter(init)
        self.text_prompts = new_prompts(prompt_depth_text - 1, n_ctx_text, self.towers.text_width)

    def text_features_need_grad(self) -> bool:
        return self.ctx.requires_grad

    def text_edits(self) -> BlockEdits:
        """Before text block j (1 .. J_t-1): positions 1 .. M_t hold block j's prompts."""
        return text_prompt_edits(list(self.text_prompts), self.n_ctx)
