"""CoOp (Zhou et al., IJCV 2022): M learned context vectors replace the template words.

Prompt = [SOS] ctx_1 .. ctx_M <class name tokens> . [EOT]; only the context vectors train
(M x text width, 16 x 512 = 8,192 at ViT-B/16). Everything of CLIP stays frozen.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vlm_adapt.backbones import Backbone
from vlm_adapt.backbones.towers import normalize
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.methods.base import CLIPMethod


class CoOp(CLIPMethod):
    method_name = "coop"

    def __init__(self, backbone: Backbone, n_ctx: int = 16, ctx_init: str | None = None, **kwargs: Any):
        """`ctx_init`: words to initialise the context from (e.g. "a photo of a"), else N(0, 0.02)."""
        super().__init__(backbone, **kwargs)
        width = self.clip.token_embedding.weight.shape[1]
        if ctx_init:
            tokens = self.tokenizer([ctx_init])
            n_ctx = int(self.towers.eot_index(tokens)[0]) - 1
            with torch.no_grad():
                init = self.towers.token_embeddings(tokens)[0, 1 : 1 + n_ctx].clone()
        else:
            init = torch.randn(n_ctx, width) * 0.02
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(init)
        self._prompt_tokens: dict[str, Tensor] = {}

    def text_features_need_grad(self) -> bool:
        return self.ctx.requires_grad

    def _tokens(self, space: LabelSpace) -> Tensor:
        """Token ids of "X X .. X <class>." with one placeholder X per context vector."""
        if space.name not in self._prompt_tokens:
            placeholder = " ".join(["X"] * self.n_ctx)
            prompts = [f"{placeholder} {name}." for name in space.classnames]
            self._prompt_tokens[space.name] = self.tokenizer(prompts)
        return self._prompt_tokens[space.name].to(self.device)

    def prompt_embeddings(self, tokens: Tensor) -> Tensor:
        """Word embeddings of the prompts with the placeholders replaced by the learned context."""
        with torch.no_grad():
            embeddings = self.towers.token_embeddings(tokens)
        ctx = self.ctx.to(embeddings.dtype).unsqueeze(0).expand(len(tokens), -1, -1)
        return torch.cat([embeddings[:, :1], ctx, embeddings[:, 1 + self.n_ctx :]], dim=1)

    def encode_label_space(self, space: LabelSpace) -> Tensor:
        tokens = self._tokens(space)
        eot = self.towers.eot_index(tokens)
        features = self.towers.encode_in_chunks(
            lambda tok, e: self.towers.encode_text_embeddings(self.prompt_embeddings(tok), e),
            tokens, eot, self.hparams.text_chunk_size,
        )
        return normalize(features)
