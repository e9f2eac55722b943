"""CoOp (Zhou et al., IJCV 2022): M learned context vectors replace the template words.

Prompt = [SOS] ctx_1 .. ctx_M <class name tokens> . [EOT]; only the context vectors train
(M x text width, 16 x 512 = 8,192 at ViT-B/16). Everything of CLIP stays frozen.

CoOp's options, as in its `trainers/coop.py`: `class_token_position` end (above), middle
([SOS] ctx_1..ctx_{M/2} <class> ctx_{M/2+1}..ctx_M . [EOT]) or front ([SOS] <class> ctx . [EOT]);
`csc`: class-specific context, one set of M vectors per class (C x M x width), N(0, 0.02). `ctx_init`
initialises a generic context from words; its length is their token count, or with
`ctx_init_length: words` the reference's word count (`len(ctx_init.split(" "))`, which differs when a
word is several tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vlm_adapt.backbones import Backbone
from vlm_adapt.backbones.towers import normalize
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.registry import register_method

POSITIONS = ("end", "middle", "front")


@register_method("coop")
class CoOp(CLIPMethod):

    def __init__(
        self,
        backbone: Backbone,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_token_position: str = "end",
        csc: bool = False,
        ctx_init_length: str = "tokens",
        **kwargs: Any,
    ):
        """`ctx_init`: words to initialise the context from (e.g. "a photo of a"), else N(0, 0.02).
        `class_token_position`: end, middle or front. `csc`: one context per training class."""
        if class_token_position not in POSITIONS:
            raise ConfigError(f"method.module.class_token_position must be one of {POSITIONS}, "
                              f"got {class_token_position!r}")
        if ctx_init_length not in ("tokens", "words"):
            raise ConfigError(f"method.module.ctx_init_length must be tokens or words, got {ctx_init_length!r}")
        if csc and ctx_init:
            raise ConfigError("method.module.csc=true learns one context per class from N(0, 0.02); "
                              "CoOp initialises only a generic context from words: set ctx_init=null or csc=false.")
        super().__init__(backbone, **kwargs)
        self.class_token_position = class_token_position
        self.csc = csc
        width = self.clip.token_embedding.weight.shape[1]
        if ctx_init:
            tokens = self.tokenizer([ctx_init])
            n_tokens = int(self.towers.eot_index(tokens)[0]) - 1
            n_ctx = len(ctx_init.split(" ")) if ctx_init_length == "words" else n_tokens
            with torch.no_grad():
                init = self.towers.token_embeddings(tokens)[0, 1 : 1 + n_ctx].clone()
            self.ctx = nn.Parameter(init)
        elif not csc:
            self.ctx = nn.Parameter(torch.randn(n_ctx, width) * 0.02)
        self.n_ctx = n_ctx
        self._prompt_tokens: dict[str, tuple[Tensor, Tensor]] = {}

    def on_label_spaces_attached(self) -> None:
        """Class-specific contexts are made once the training classes are known (and keep them)."""
        if not self.csc or hasattr(self, "ctx"):
            return
        if self.train_label_space is None:
            raise ConfigError("CoOp with csc=true needs a training label space (its contexts are per class).")
        width = self.clip.token_embedding.weight.shape[1]
        self.ctx = nn.Parameter(torch.randn(self.train_label_space.num_classes, self.n_ctx, width) * 0.02)

    def supports_label_space(self, space: LabelSpace) -> bool:
        # class-specific contexts belong to the training classes; another label space has none
        return not self.csc or space.classnames == self.train_label_space.classnames

    def text_features_need_grad(self) -> bool:
        return self.ctx.requires_grad

    def _tokens(self, space: LabelSpace) -> tuple[Tensor, Tensor]:
        """Token ids of the prompts with one placeholder X per context vector, and (C, M) positions
        of the context vectors in each prompt."""
        if space.name not in self._prompt_tokens:
            # context vectors before the class name: all (end), none (front) or the first half (middle)
            before = {"end": self.n_ctx, "front": 0, "middle": self.n_ctx // 2}[self.class_token_position]
            xs = ["X"] * self.n_ctx
            name_lengths = (self.towers.eot_index(self.tokenizer(list(space.classnames))) - 1).tolist()
            prompts, positions = [], []
            for name, length in zip(space.classnames, name_lengths, strict=True):
                prompts.append(" ".join(xs[:before] + [name] + xs[before:]) + ".")
                positions.append(list(range(1, 1 + before)) + list(range(1 + before + length, 1 + length + self.n_ctx)))
            self._prompt_tokens[space.name] = (self.tokenizer(prompts), torch.tensor(positions))
        tokens, positions = self._prompt_tokens[space.name]
        return tokens.to(self.device), positions.to(self.device)

    def prompt_embeddings(
        self, tokens: Tensor, positions: Tensor, classes: Tensor, ctx: Tensor | None = None
    ) -> Tensor:
        """Word embeddings of the prompts with the placeholders replaced by the learned context (or by
        `ctx`, one (M, width) context per prompt)."""
        with torch.no_grad():
            embeddings = self.towers.token_embeddings(tokens).clone()
        if ctx is None:
            ctx = self.ctx[classes] if self.csc else self.ctx.unsqueeze(0).expand(len(tokens), -1, -1)
        rows = torch.arange(len(tokens), device=tokens.device).unsqueeze(1).expand_as(positions)
        embeddings[rows, positions] = ctx.to(embeddings.dtype)
        return embeddings

    def encode_label_space(self, space: LabelSpace) -> Tensor:
        tokens, positions = self._tokens(space)
        eot = self.towers.eot_index(tokens)
        classes = torch.arange(len(tokens), device=tokens.device)
        features = self.towers.encode_in_chunks(
            lambda idx, e: self.towers.encode_text_embeddings(
                self.prompt_embeddings(tokens[idx], positions[idx], idx), e
            ),
            classes, eot, self.hparams.text_chunk_size,
        )
        return normalize(features)
