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
from vlm_adapt.backbones.towers import BlockEdits, normalize
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.registry import register_method

MAX_INIT_WORDS_CTX = 4  # the reference initialises the context from words only up to 4 vectors


@register_method("maple")
class MaPLe(CLIPMethod):

    def __init__(self, backbone: Backbone, n_ctx: int = 2, ctx_init: str | None = "a photo of a",
                 prompt_depth: int = 9, **kwargs: Any):
        """`n_ctx`: prompt tokens per block (M); `ctx_init`: the prompt's words, whose first M tokens the
        context replaces and initialises from (null: M placeholder words, N(0, 0.02)); `prompt_depth`:
        J, the blocks of each tower that get prompts (1 = the input only)."""
        super().__init__(backbone, **kwargs)
        depth_limit = min(self.towers.num_text_layers, self.towers.num_image_layers)
        if not isinstance(n_ctx, int) or n_ctx < 1:
            raise ConfigError(f"method.module.n_ctx must be a positive number of prompt tokens, got {n_ctx!r}.")
        if not isinstance(prompt_depth, int) or not 1 <= prompt_depth <= depth_limit:
            raise ConfigError(f"method.module.prompt_depth must be between 1 and {depth_limit} (the towers' "
                              f"block count), got {prompt_depth!r}.")
        text_width, image_width = self.towers.text_width, self.towers.image_width
        if ctx_init:
            if n_ctx > MAX_INIT_WORDS_CTX:
                raise ConfigError(f"MaPLe initialises its context from words only for n_ctx <= {MAX_INIT_WORDS_CTX} "
                                  f"(the reference ignores ctx_init beyond); got n_ctx={n_ctx}: set "
                                  "method.module.ctx_init=null for a random context, or a smaller n_ctx.")
            tokens = self.tokenizer([ctx_init])
            if int(self.towers.eot_index(tokens)[0]) - 1 < n_ctx:
                raise ConfigError(f"method.module.ctx_init={ctx_init!r} has fewer than n_ctx={n_ctx} tokens to "
                                  "initialise the context from; give more words or a smaller n_ctx.")
            with torch.no_grad():
                init = self.towers.token_embeddings(tokens)[0, 1 : 1 + n_ctx].clone()
            self.prompt_prefix = ctx_init
        else:
            init = torch.randn(n_ctx, text_width) * 0.02
            self.prompt_prefix = " ".join(["X"] * n_ctx)
        self.n_ctx = n_ctx
        self.prompt_depth = prompt_depth
        self.ctx = nn.Parameter(init)
        self.proj = nn.Linear(text_width, image_width)
        self.compound_prompts_text = nn.ParameterList(
            nn.Parameter(torch.randn(n_ctx, text_width) * 0.02) for _ in range(prompt_depth - 1)
        )
        coupling = nn.Linear(text_width, image_width)
        self.compound_prompt_projections = nn.ModuleList(copy.deepcopy(coupling) for _ in range(prompt_depth - 1))
        self._prompt_tokens: dict[str, Tensor] = {}

    def text_features_need_grad(self) -> bool:
        return self.ctx.requires_grad

    def image_features_need_grad(self) -> bool:
        return self.ctx.requires_grad

    # ------------------------------------------------------------ prompts inside the towers
    def text_edits(self) -> BlockEdits:
        """Before text block j (1 .. J-1): positions 1 .. M hold that block's deep text prompts."""
        def replace(prompt: Tensor):
            def edit(x: Tensor) -> Tensor:
                deep = prompt.to(x.dtype).unsqueeze(0).expand(len(x), -1, -1)
                return torch.cat([x[:, :1], deep, x[:, 1 + self.n_ctx:]], dim=1)
            return edit
        return {j + 1: replace(prompt) for j, prompt in enumerate(self.compound_prompts_text)}

    def image_edits(self) -> BlockEdits:
        """Before vision block j (1 .. J-1): the last M tokens are F_j(P_j), the coupled text prompts."""
        def replace(prompt: Tensor):
            def edit(x: Tensor) -> Tensor:
                deep = prompt.to(x.dtype).unsqueeze(0).expand(len(x), -1, -1)
                return torch.cat([x[:, : x.shape[1] - self.n_ctx], deep], dim=1)
            return edit
        visual = [project(prompt) for project, prompt in zip(self.compound_prompt_projections,
                                                              self.compound_prompts_text, strict=True)]
        return {j + 1: replace(prompt) for j, prompt in enumerate(visual)}

    # ------------------------------------------------------------ features
    def encode_images(self, images: Tensor, index: Tensor | None = None) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.image_features_need_grad()):
            return self.towers.encode_image(images, extra=self.proj(self.ctx), edits=self.image_edits())

    def prompt_tokens(self, space: LabelSpace) -> Tensor:
        """Token ids of "<prefix> <class>." for every class of `space`."""
        if space.name not in self._prompt_tokens:
            prompts = [f"{self.prompt_prefix} {name}." for name in space.classnames]
            self._prompt_tokens[space.name] = self.tokenizer(prompts)
        return self._prompt_tokens[space.name].to(self.device)

    def prompt_embeddings(self, tokens: Tensor) -> Tensor:
        """Word embeddings with positions 1 .. M replaced by the learned context."""
        with torch.no_grad():
            words = self.towers.token_embeddings(tokens)
        ctx = self.ctx.to(words.dtype).unsqueeze(0).expand(len(tokens), -1, -1)
        return torch.cat([words[:, :1], ctx, words[:, 1 + self.n_ctx:]], dim=1)

    def encode_label_space(self, space: LabelSpace) -> Tensor:
        tokens = self.prompt_tokens(space)
        edits = self.text_edits()
        features = self.towers.encode_in_chunks(
            lambda tok, eot: self.towers.encode_text_embeddings(self.prompt_embeddings(tok), eot, edits),
            tokens, self.towers.eot_index(tokens), self.hparams.text_chunk_size,
        )
        return normalize(features)
