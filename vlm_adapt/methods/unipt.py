"""UniPT (Diao et al., CVPR 2024): a light parallel network per tower over the frozen backbone's hidden states.

The whole CLIP runs under no_grad and hands over every layer's tokens (embedding output plus each
resblock's output) and its frozen final feature (CLS for images, EOT for text). Per tower, with
d = tower width / factor:

1. layer l's tokens -> ReLU -> Linear(width -> d), one Linear per layer;
2. anchor = the frozen final feature -> ReLU -> Linear(embed_dim -> d). The anchor lives in the joint
   embedding space (embed_dim wide), the tokens in the tower's residual stream (width wide), so each
   has its own down-projection into the common d;
3. per layer: weights = L1-normalize(ReLU(anchor . tokens^T)) over the real tokens (text: positions up
   to the EOT token), summary = weights @ tokens + the layer's own CLS/EOT token;
4. confidence: Linear(d -> 1) on anchor * mean of the real tokens, per layer; softmax over layers;
   the confidence-weighted sum of the summaries;
5. ReLU -> Linear(d -> embed_dim), added to the frozen final feature.

Only the two parallel networks train (ViT-B/16: 6,203,778 parameters at factor 2, 12,406,530 at 1).
d follows the specification (tower width / factor) by default; the reference code uses embed_dim / factor
(`width_from: embed_dim`, the default of the paper experiments), the same for ViT-B/16's text tower (512 wide)
but narrower on its vision side (256/512 instead of 384/768).

No backbone activation is kept for backward. Because the backbone is frozen and deterministic, a
training sample's hidden states are computed the first time it is seen and read back in later epochs
when training has no augmentation (`augment: none`, the default here). `cache: cpu` (default) keeps
them in host memory, `device` on the GPU the model trains on, `none` re-runs the backbone every step.
They are large (ViT-B/16: about 7.9 MB per image in fp32, ~0.4 MB per caption), so the cache
refuses to start when projected above `max_cache_gb`; each DDP process keeps its own. Images are
still decoded every epoch (the datamodule does not know what is cached). Class prompts' hidden
states are computed once per label space, on the model's device. Validation and test inputs run
the frozen backbone each time (under no_grad).

Two tasks: classification on CLIP logits with class prompts (CoOp-style datasets and protocols), and
image-text retrieval (`protocol=retrieval`) trained with the symmetric InfoNCE loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_adapt.backbones import Backbone
from vlm_adapt.backbones.towers import class_features
from vlm_adapt.data.feature_cache import FeatureCache, TowerStates
from vlm_adapt.data.inputs import TrainingInputs
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.registry import CLASSIFICATION, RETRIEVAL, CacheSpec, register_method

log = logging.getLogger(__name__)

CACHE_PLACES = ("cpu", "device", "none")
WIDTH_RULES = ("tower", "embed_dim")


class ParallelNetwork(nn.Module):
    """UniPT's network beside one frozen tower: layer tokens + frozen feature -> adapted feature."""

    def __init__(self, num_layers: int, width: int, embed_dim: int, factor: int, width_from: str = "tower"):
        """d = `width` / factor (`width_from: tower`, the specification) or `embed_dim` / factor
        (`width_from: embed_dim`, the reference code's rule)."""
        super().__init__()
        if width_from not in WIDTH_RULES:
            raise ConfigError(f"method.module.width_from must be one of {WIDTH_RULES}, got {width_from!r}")
        base = width if width_from == "tower" else embed_dim
        if factor < 1 or base % factor:
            raise ConfigError(
                f"UniPT factor must divide the {width_from} width {base} (the paper uses 1 or 2), got {factor}"
            )
        d = base // factor
        self.token_down = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Linear(width, d)) for _ in range(num_layers))
        self.anchor_down = nn.Sequential(nn.ReLU(), nn.Linear(embed_dim, d))
        self.confidence = nn.Linear(d, 1)
        self.up = nn.Sequential(nn.ReLU(), nn.Linear(d, embed_dim))

    def forward(self, states: TowerStates) -> Tensor:
        dtype = self.confidence.weight.dtype
        pooled = states.pooled.to(dtype)
        anchor = self.anchor_down(pooled)  # (N, d)
        num_tokens = states.layers[0].shape[1]
        positions = torch.arange(num_tokens, device=anchor.device)
        mask = (positions[None, :] < states.lengths[:, None]).to(dtype)  # (N, T): 1 on real tokens
        rows = torch.arange(len(anchor), device=anchor.device)
        summaries, scores = [], []
        for down, hidden in zip(self.token_down, states.layers, strict=True):
            tokens = down(hidden.to(dtype))  # (N, T, d)
            weights = F.relu(torch.einsum("nd,ntd->nt", anchor, tokens)) * mask
            weights = F.normalize(weights, p=1, dim=-1, eps=1e-6)
            summaries.append(torch.einsum("nt,ntd->nd", weights, tokens) + tokens[rows, states.pool_index])
            mean = torch.einsum("nt,ntd->nd", mask, tokens) / mask.sum(dim=1, keepdim=True)
            scores.append(self.confidence(anchor * mean))
        confidence = torch.softmax(torch.cat(scores, dim=1), dim=1)  # (N, layers)
        merged = torch.einsum("nl,nld->nd", confidence, torch.stack(summaries, dim=1))
        return pooled + self.up(merged)


@register_method("unipt", tasks=(CLASSIFICATION, RETRIEVAL),
                 caches=(CacheSpec("hidden states of both towers", "once", augmented=False),))
class UniPT(CLIPMethod):
    """Both parallel networks train; the task (classification or retrieval) comes from the datamodule."""

    def __init__(
        self,
        backbone: Backbone,
        factor: int = 2,
        width_from: str = "tower",
        cache: str = "cpu",
        cache_dtype: str | None = None,
        max_cache_gb: float | None = 32.0,
        **kwargs: Any,
    ):
        """`factor`: d = tower width / factor (`width_from: embed_dim`: embed_dim / factor, the reference's
        rule). `cache`: where training samples' hidden states are kept
        across epochs (cpu, device = the model's device, none = re-run the frozen backbone every step);
        `cache_dtype`: their storage dtype (null = the backbone's); `max_cache_gb`: refuse a larger cache."""
        super().__init__(backbone, **kwargs)
        if cache not in CACHE_PLACES:
            raise ConfigError(f"method.module.cache must be one of {CACHE_PLACES}, got {cache!r}")
        if cache_dtype is not None and not isinstance(getattr(torch, cache_dtype, None), torch.dtype):
            raise ConfigError(f"method.module.cache_dtype must name a torch dtype (float16, ...), got {cache_dtype!r}")
        visual = self.clip.visual
        if getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "attn_pool", None) is not None:
            raise ConfigError("UniPT reads each layer's class token; it needs a ViT pooled by its class token.")
        embed_dim = visual.output_dim
        self.image_parallel = ParallelNetwork(
            self.towers.num_image_layers + 1, visual.transformer.width, embed_dim, factor, width_from
        )
        self.text_parallel = ParallelNetwork(
            self.towers.num_text_layers + 1, self.clip.transformer.width, embed_dim, factor, width_from
        )
        self.image_cache: FeatureCache | None = None
        self.caption_cache: FeatureCache | None = None
        self._prompt_states: dict[str, list[tuple[Tensor, TowerStates]]] = {}

    # ------------------------------------------------------------ frozen backbone
    def image_states(self, images: Tensor) -> TowerStates:
        with torch.no_grad():
            hidden = self.towers.image_hidden_states(images)
        n, num_tokens = hidden.layers[0].shape[:2]
        lengths = torch.full((n,), num_tokens, device=images.device)
        class_token = torch.zeros(n, dtype=torch.long, device=images.device)
        return TowerStates(hidden.layers, lengths, class_token, hidden.pooled)

    def text_states(self, tokens: Tensor) -> TowerStates:
        with torch.no_grad():
            hidden = self.towers.text_hidden_states(tokens)
        return TowerStates(hidden.layers, hidden.eot_index + 1, hidden.eot_index, hidden.pooled)

    def _cached_states(
        self, cache: FeatureCache, index: Tensor, compute: Callable[[list[int]], TowerStates]
    ) -> TowerStates:
        """Run the backbone only on samples not cached yet, then read the whole batch from the cache."""
        keys = index.tolist()
        rows = cache.missing(keys)
        if rows:
            cache.put([keys[row] for row in rows], compute(rows))
        return cache.get(keys, self.device)

    # ------------------------------------------------------------ encoders
    def encode_images(self, images: Tensor, index: Tensor | None = None) -> Tensor:
        """Adapted image features; training samples (`index` given) go through the cache when there is one."""
        if index is not None and self.image_cache is not None:
            states = self._cached_states(self.image_cache, index, lambda rows: self.image_states(images[rows]))
        else:
            states = self.image_states(images)
        return self.image_parallel(states)

    def encode_prompts(self, prompts: list[str], index: Tensor | None = None) -> Tensor:
        """Adapted text features of captions or prompts; training captions go through the cache when there is one."""
        tokens = self.tokenizer(prompts).to(self.device)
        if index is not None and self.caption_cache is not None:
            states = self._cached_states(self.caption_cache, index, lambda rows: self.text_states(tokens[rows]))
            return self.text_parallel(states)
        return self.towers.encode_in_chunks(
            lambda tok, _: self.text_parallel(self.text_states(tok)), tokens, self.towers.eot_index(tokens),
            self.hparams.text_chunk_size,
        )

    def _prompt_chunks(self, space: LabelSpace) -> list[tuple[Tensor, TowerStates]]:
        """A label space's prompt hidden states, computed once, in chunks of prompts of similar length."""
        if space.name not in self._prompt_states:
            tokens = self.tokenizer(space.prompts()).to(self.device)
            order = torch.argsort(self.towers.eot_index(tokens))
            self._prompt_states[space.name] = [
                (rows, self.text_states(tokens[rows])) for rows in torch.split(order, self.hparams.text_chunk_size)
            ]
        return self._prompt_states[space.name]

    def encode_label_space(self, space: LabelSpace) -> Tensor:
        chunks = self._prompt_chunks(space)
        features = torch.cat([self.text_parallel(states.to(self.device)) for _, states in chunks])
        order = torch.cat([rows for rows, _ in chunks]).to(self.device)
        return class_features(features[torch.argsort(order)], len(space.templates))

    def text_features_need_grad(self) -> bool:
        return any(p.requires_grad for p in self.text_parallel.parameters())

    def on_label_spaces_attached(self) -> None:
        self._prompt_states.clear()

    # ------------------------------------------------------------ task and cache set-up
    def setup(self, stage: str) -> None:
        """For fitting, create the caches when inputs repeat exactly (no augmentation)."""
        super().setup(stage)
        datamodule = self.trainer.datamodule
        if stage != "fit":
            return
        self.image_cache = self.caption_cache = None
        if self.hparams.cache == "none" or datamodule is None:
            return
        if datamodule.augment != "none":
            log.info("UniPT: augmentation %r changes inputs each epoch; no hidden-state cache", datamodule.augment)
            return
        if self.retrieval:
            self.image_cache = self._new_cache("image", len(datamodule.train_split.images))
            self.caption_cache = self._new_cache("caption", len(datamodule.train_split.captions))
        else:
            self.image_cache = self._new_cache("image", len(datamodule.train_items))

    def training_inputs(self) -> TrainingInputs:
        """(index, image, label) batches while the hidden states are cached: the index keys the cache."""
        return TrainingInputs(index=self.image_cache is not None)

    def _new_cache(self, name: str, num_samples: int) -> FeatureCache:
        device = "cpu" if self.hparams.cache == "cpu" else None  # None: where the backbone ran (the model's device)
        dtype = getattr(torch, self.hparams.cache_dtype) if self.hparams.cache_dtype else None
        return FeatureCache(name, num_samples, device, dtype, self.hparams.max_cache_gb)

    def on_fit_end(self) -> None:
        self.image_cache = self.caption_cache = None  # free the memory before testing

