"""CLIP's two towers split into stages, so methods reuse open_clip's layers instead of re-writing them.

Vision: `image_tokens` (patch + class + position embeddings, ln_pre) -> `image_layers(a, b)` ->
`image_head` (ln_post, pooling, projection). Text: `text_embeddings` -> `text_layers(a, b)` ->
`text_head` (ln_final, end-of-text token, projection). `*_hidden_states` return every layer's
output for methods that read them (UniPT).

The text tower is causal, so the feature at the end-of-text (EOT) token does not depend on the
padding after it: every text path here runs only the first `max(eot) + 1` positions.

Methods that work inside the towers do so without copying open_clip's block forward: extra tokens
join the image sequence before `ln_pre` (`image_tokens(images, extra)`, as VPT and MaPLe prompt), and
`edits` ({block index: function of the block's input tokens}) change the sequence entering chosen
blocks of either tower (deep prompts replacing the previous block's prompt outputs). Modules inside a
block (LoRA, adapters, prefix keys/values) wrap the block's own submodules instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_adapt.errors import ConfigError

BlockEdits = Mapping[int, Callable[[Tensor], Tensor]]
"""{block index: f(tokens entering that block) -> tokens the block runs on}, (N, T, width) in and out."""


@dataclass
class TextHiddenStates:
    """Per-layer text tokens (embedding output first), truncated to the longest prompt."""

    layers: list[Tensor]  # L + 1 tensors of shape (N, T, width)
    eot_index: Tensor  # (N,) position of the end-of-text token
    pooled: Tensor  # (N, embed_dim) the frozen final feature


@dataclass
class ImageHiddenStates:
    layers: list[Tensor]  # L + 1 tensors of shape (N, 1 + patches, width)
    pooled: Tensor  # (N, embed_dim)


class CLIPTowers:
    """Stage-wise access to an open_clip `CLIP` (held by reference, not registered as a submodule)."""

    def __init__(self, clip: nn.Module, truncate_text: bool = True):
        """`truncate_text=False` runs all context positions, as open_clip does (for measuring the gain)."""
        self._clip = [clip]  # a list keeps nn.Module from registering it twice
        self.truncate_text = truncate_text
        pool = getattr(clip, "text_pool_type", "argmax")
        if pool not in ("argmax", "eos"):
            raise ConfigError(f"text pool type {pool!r} is not supported; vlm_adapt needs 'argmax' or 'eos'.")
        if not getattr(clip.visual.transformer, "batch_first", True):
            raise ConfigError("vlm_adapt needs open_clip transformers in batch-first layout.")

    @property
    def clip(self) -> nn.Module:
        return self._clip[0]

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def num_image_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def num_text_layers(self) -> int:
        return len(self.clip.transformer.resblocks)

    @property
    def image_width(self) -> int:
        return self.visual.transformer.width

    @property
    def text_width(self) -> int:
        return self.clip.token_embedding.weight.shape[1]

    def _check_edits(self, edits: BlockEdits | None, num_layers: int, tower: str) -> BlockEdits:
        outside = sorted(i for i in (edits or {}) if not 0 <= i < num_layers)
        if outside:
            raise ConfigError(f"the {tower} tower has blocks 0..{num_layers - 1}; no block {outside[0]} to edit.")
        return edits or {}

    # ---------------------------------------------------------------- vision
    def image_embeddings(self, images: Tensor) -> Tensor:
        """Patch, class and position embeddings (and patch dropout), before ln_pre: (N, 1 + patches, width)."""
        visual = self.visual
        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.patch_dropout(x)

    def image_tokens(self, images: Tensor, extra: Tensor | None = None) -> Tensor:
        """Embedding output after ln_pre, (N, 1 + patches [+ E], width); `extra` (E, width) or (N, E, width)
        tokens are appended after the patches, before ln_pre."""
        if extra is None:
            return self.visual._embeds(images)
        x = self.image_embeddings(images)
        extra = extra.to(x.dtype)
        if extra.dim() == 2:
            extra = extra.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.visual.ln_pre(torch.cat([x, extra], dim=1))

    def image_layers(self, x: Tensor, start: int = 0, end: int | None = None,
                     edits: BlockEdits | None = None) -> Tensor:
        """Run visual resblocks[start:end], applying `edits[i]` to the input of block i."""
        edits = self._check_edits(edits, self.num_image_layers, "image")
        blocks = self.visual.transformer.resblocks
        for i in range(*slice(start, end).indices(len(blocks))):
            if i in edits:
                x = edits[i](x)
            x = blocks[i](x)
        return x

    def image_head(self, x: Tensor) -> Tensor:
        """ln_post, class-token pooling and projection."""
        pooled, _ = self.visual._pool(x)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled

    def encode_image(self, images: Tensor, extra: Tensor | None = None, edits: BlockEdits | None = None) -> Tensor:
        """Image features; `extra` tokens join before ln_pre, `edits` change chosen blocks' inputs."""
        return self.image_head(self.image_layers(self.image_tokens(images, extra), edits=edits))

    def image_hidden_states(self, images: Tensor) -> ImageHiddenStates:
        x = self.image_tokens(images)
        layers = [x]
        for block in self.visual.transformer.resblocks:
            x = block(x)
            layers.append(x)
        return ImageHiddenStates(layers, self.image_head(x))

    # ------------------------------------------------------------------ text
    def eot_index(self, tokens: Tensor) -> Tensor:
        if self.clip.text_pool_type == "eos":
            return (tokens == self.clip.text_eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)

    def text_length(self, eot_index: Tensor) -> int:
        """Positions the text tower runs: up to the longest prompt's EOT token (all, untruncated)."""
        return int(eot_index.max()) + 1 if self.truncate_text else self.clip.positional_embedding.shape[0]

    def token_embeddings(self, tokens: Tensor) -> Tensor:
        """Word embeddings without positions: (N, context_length, width)."""
        return self.clip.token_embedding(tokens)

    def text_embeddings(self, word_embeddings: Tensor, length: int) -> Tensor:
        """First `length` positions of the word embeddings plus positional embeddings."""
        x = word_embeddings[:, :length]
        return x + self.clip.positional_embedding[:length].to(x.dtype)

    def text_layers(self, x: Tensor, start: int = 0, end: int | None = None,
                    edits: BlockEdits | None = None) -> Tensor:
        """Run text resblocks[start:end] with the causal mask cut to the sequence length, applying
        `edits[i]` to the input of block i."""
        edits = self._check_edits(edits, self.num_text_layers, "text")
        blocks = self.clip.transformer.resblocks
        for i in range(*slice(start, end).indices(len(blocks))):
            if i in edits:
                x = edits[i](x)
            length = x.shape[1]
            x = blocks[i](x, attn_mask=self.clip.attn_mask[:length, :length])
        return x

    def text_head(self, x: Tensor, eot_index: Tensor) -> Tensor:
        x = self.clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index]
        projection = self.clip.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection

    def encode_text_embeddings(self, word_embeddings: Tensor, eot_index: Tensor,
                               edits: BlockEdits | None = None) -> Tensor:
        """Text features from (possibly learned) word embeddings; runs max(eot) + 1 positions only.
        `edits` must keep the positions up to each end-of-text token where they are (the tower is causal)."""
        x = self.text_layers(self.text_embeddings(word_embeddings, self.text_length(eot_index)), edits=edits)
        return self.text_head(x, eot_index)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Same result as open_clip's `encode_text`, without running the padding."""
        eot = self.eot_index(tokens)
        return self.encode_text_embeddings(self.token_embeddings(tokens[:, : self.text_length(eot)]), eot)

    def text_hidden_states(self, tokens: Tensor) -> TextHiddenStates:
        eot = self.eot_index(tokens)
        length = self.text_length(eot)
        x = self.text_embeddings(self.token_embeddings(tokens[:, :length]), length)
        layers = [x]
        mask = self.clip.attn_mask[:length, :length]
        for block in self.clip.transformer.resblocks:
            x = block(x, attn_mask=mask)
            layers.append(x)
        return TextHiddenStates(layers, eot, self.text_head(x, eot))

    def encode_in_chunks(self, encode, inputs: Tensor, eot_index: Tensor, chunk_size: int) -> Tensor:
        """Apply `encode(inputs_chunk, eot_chunk)` over chunks of prompts sorted by length.

        Sorting puts prompts of similar length together, so each chunk runs only as many
        positions as its own longest prompt; the result comes back in the original order.
        """
        order = torch.argsort(eot_index)
        outputs = [
            encode(inputs[idx], eot_index[idx]) for idx in torch.split(order, chunk_size)
        ]
        features = torch.cat(outputs)
        return features[torch.argsort(order)]


def normalize(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)


def class_features(features: Tensor, num_templates: int) -> Tensor:
    """Class-major prompt features (C x T, D) -> (C, D): the normalized mean of each class's normalized
    template features, CLIP's prompt ensembling."""
    features = normalize(features)
    return normalize(features.view(-1, num_templates, features.shape[-1]).mean(dim=1))
