"""MaPLe (Khattak et al., CVPR 2023): multi-modal prompts, the vision prompts projected from the text ones.

Text: the prompt "<ctx_init> <class>." with its first M tokens after [SOS] replaced by the learned context
(M = 2 from "a photo of a": [SOS] ctx_1 ctx_2 of a <class> . [EOT]); before each of the text blocks
1 .. J-1 (J = prompt depth, 9) the outputs at those M positions are replaced by that block's learned
prompts. Vision: proj(ctx) is appended after the patches before ln_pre, and before each vision block
j = 1 .. J-1 the last M tokens are replaced by F_j(P_j), the j-th text prompts coupled into the vision
width by their own Linear. Trainable at ViT-B/16 (text 512, vision 768, J = 9, M = 2):
ctx 2 x 512 + proj (512 x 768 + 768) + 8 deep text prompts 2 x 512 + 8 projections (512 x 768 + 768)
= 1,024 + 393,984 + 8,192 + 3,151,872 = 3,555,072.

As the reference (muzairkhattak/multimodal-prompt-learning trainers/maple.py, clip/model.py): the deep
text prompts N(0, 0.02); the eight coupling projections are copies of one freshly initialised Linear;
context words initialise the context only when M <= 4.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from vlm_adapt.backbones import Backbone
from vlm_adapt.backbones.towers import BlockEdits
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.deep_prompts import (
    LeadingContextPrompts,
    check_prompts,
    context_from_words,
    image_prompt_edits,
    new_prompts,
    text_prompt_edits,
)
from vlm_adapt.methods.registry import register_method


@register_method("maple")
class MaPLe(LeadingContextPrompts, CLIPMethod):

    def __init__(self, backbone: Backbone, n_ctx: int = 2, ctx_init: str | None = "a photo of a",
                 prompt_depth: int = 9, **kwargs: Any):
        """`n_ctx`: prompt tokens per block (M); `ctx_init`: the prompt's words, whose first M tokens the
        context replaces and initialises from (null: M placeholder words, N(0, 0.02)); `prompt_depth`:
        J, the blocks of each tower that get prompts (1 = the input only)."""
        super().__init__(backbone, **kwargs)
        depth_limit = min(self.towers.num_text_layers, self.towers.num_image_layers)
        check_prompts(n_ctx, prompt_depth, depth_limit, "n_ctx", "prompt_depth")
        text_width, image_width = self.towers.text_width, self.towers.image_width
        init, self.prompt_prefix = context_from_words(self.towers, self.tokenizer, ctx_init, n_ctx)
        self.n_ctx = n_ctx
        self.prompt_depth = prompt_depth
        self.ctx = nn.Parameter(init)
        self.proj = nn.Linear(text_width, image_width)
        self.compound_prompts_text = new_prompts(prompt_depth - 1, n_ctx, text_width)
        coupling = nn.Linear(text_width, image_width)
        self.compound_prompt_projections = nn.ModuleList(copy.deepcopy(coupling) for _ in range(prompt_depth - 1))

    def text_features_need_grad(self) -> bool:
        return self.ctx.requires_grad

    def image_features_need_grad(self) -> bool:
        return self.ctx.requires_grad

    # ------------------------------------------------------------ prompts inside the towers
    def text_edits(self) -> BlockEdits:
        """Before text block j (1 .. J-1): positions 1 .. M hold that block's deep text prompts."""
        return text_prompt_edits(self.compound_prompts_text, self.n_ctx)

    def image_edits(self) -> BlockEdits:
        """Before vision block j (1 .. J-1): the last M tokens are F_j(P_j), the coupled text prompts."""
        return image_prompt_edits([project(prompt) for project, prompt in zip(
            self.compound_prompt_projections, self.compound_prompts_text, strict=True)])

    # ------------------------------------------------------------ features
    def encode_images(self, images: Tensor, index: Tensor | None = None) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.image_features_need_grad()):
            return self.towers.encode_image(images, extra=self.proj(self.ctx), edits=self.image_edits())
