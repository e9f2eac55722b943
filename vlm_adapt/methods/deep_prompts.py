"""Deep prompts: the pieces VPT, IVLP, MaPLe and PromptSRC share for learned tokens inside the towers.

The layout is the one of muzairkhattak/multimodal-prompt-learning (clip/model.py, trainers/*.py), which the
VPT, IVLP, MaPLe and PromptSRC references share:
- text: the prompt "<ctx_init> <class>." whose first M tokens after [SOS] are the learned context; before
  each text block j = 1 .. J-1 the outputs at positions 1 .. M are replaced by block j's own prompts;
- vision: M learned tokens appended after the patch tokens before ln_pre; before each vision block
  j = 1 .. J-1 the last M tokens are replaced by block j's prompts.
J (the prompt depth) counts the input as the first of the J blocks that get prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vlm_adapt.backbones.towers import BlockEdits, CLIPTowers, normalize
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.errors import ConfigError

MAX_INIT_WORDS_CTX = 4  # the references initialise the context from words only up to 4 vectors


def check_prompts(n_ctx: object, depth: object, layers: int, ctx_option: str, depth_option: str) -> None:
    """A positive token count and a depth between 1 and the tower's block count, or a ConfigError."""
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 1:
        raise ConfigError(f"method.module.{ctx_option} must be a positive number of prompt tokens, got {n_ctx!r}.")
    if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= layers:
        raise ConfigError(f"method.module.{depth_option} must be between 1 and {layers} (the tower's block "
                          f"count), got {depth!r}.")


def new_prompts(count: int, n_tokens: int, width: int) -> nn.ParameterList:
    """`count` prompts of `n_tokens` x `width`, N(0, 0.02) as the references initialise them."""
    return nn.ParameterList(nn.Parameter(torch.randn(n_tokens, width) * 0.02) for _ in range(count))


def text_prompt_edits(prompts: Sequence[Tensor], n_ctx: int) -> BlockEdits:
    """Before text block j + 1, positions 1 .. n_ctx hold `prompts[j]`."""
    def replace(prompt: Tensor):
        def edit(x: Tensor) -> Tensor:
            deep = prompt.to(x.dtype).unsqueeze(0).expand(len(x), -1, -1)
            return torch.cat([x[:, :1], deep, x[:, 1 + n_ctx:]], dim=1)
        return edit
    return {j + 1: replace(prompt) for j, prompt in enumerate(prompts)}


def image_prompt_edits(prompts: Sequence[Tensor]) -> BlockEdits:
    """Before vision block j + 1, the last tokens (as many as `prompts[j]` has) are `prompts[j]`."""
    def replace(prompt: Tensor):
        def edit(x: Tensor) -> Tensor:
            deep = prompt.to(x.dtype).unsqueeze(0).expand(len(x), -1, -1)
            return torch.cat([x[:, : x.shape[1] - len(prompt)], deep], dim=1)
        return edit
    return {j + 1: replace(prompt) for j, prompt in enumerate(prompts)}


def context_from_words(towers: CLIPTowers, tokenizer, ctx_init: str | None, n_ctx: int) -> tuple[Tensor, str]:
    """The initial context (n_ctx x text width) and the words the prompt starts with.

    With `ctx_init`, its first n_ctx token embeddings and the words themselves; without, N(0, 0.02) and
    n_ctx placeholder words. The references ignore `ctx_init` beyond 4 vectors; that is refused here."""
    if not ctx_init:
        return torch.randn(n_ctx, towers.text_width) * 0.02, " ".join(["X"] * n_ctx)
    if n_ctx > MAX_INIT_WORDS_CTX:
        raise ConfigError(f"the context is initialised from words only for n_ctx <= {MAX_INIT_WORDS_CTX} (the "
                          f"reference ignores ctx_init beyond); got n_ctx={n_ctx}: set method.module.ctx_init=null "
                          "for a random context, or a smaller n_ctx.")
    tokens = tokenizer([ctx_init])
    if int(towers.eot_index(tokens)[0]) - 1 < n_ctx:
        raise ConfigError(f"method.module.ctx_init={ctx_init!r} has fewer than n_ctx={n_ctx} tokens to initialise "
                          "the context from; give more words or a smaller n_ctx.")
    with torch.no_grad():
        init = towers.token_embeddings(tokens)[0, 1 : 1 + n_ctx].clone()
    return init, ctx_init


class LeadingContextPrompts:
    """Mixin for a CLIPMethod whose class prompts are "<prompt_prefix> <class>." with positions 1 .. n_ctx
    replaced by `self.ctx` and the text blocks changed by `self.text_edits()`."""

    ctx: nn.Parameter
    n_ctx: int
    prompt_prefix: str

    def text_edits(self) -> BlockEdits:
        return {}

    def prompt_tokens(self, space: LabelSpace) -> Tensor:
        """Token ids of "<prefix> <class>." for every class of `space`."""
        cache = self.__dict__.setdefault("_prompt_tokens", {})
        if space.name not in cache:
            cache[space.name] = self.tokenizer([f"{self.prompt_prefix} {name}." for name in space.classnames])
        return cache[space.name].to(self.device)

    def prompt_embeddings(self, tokens: Tensor) -> Tensor:
        """Word embeddings with positions 1 .. n_ctx replaced by the learned context."""
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
