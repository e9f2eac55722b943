"""Skip Tuning (Wu et al., CVPR 2025): full fine-tuning of the top layers with layer- and class-wise skipping.

Trainable: resblocks w..L-1 of both towers, `ln_final`, `text_projection`, `visual.ln_post` and
`visual.proj` (w = `start_layer`, 6 of 12 at ViT-B/16: 62,099,456 parameters). Frozen: the token,
positional and class embeddings, `conv1`, `ln_pre`, resblocks 0..w-1 and `logit_scale`.

LSkip (layer-wise skipping). The first w layers are frozen, so their output for an image depends
only on the image and its augmentation. At the start of every epoch the frozen layers run once, under
no_grad, over every training image with that epoch's augmentation, and the layer-w tokens are kept
(the `layer_w_tokens` cache of the shared service, `vlm_adapt/data/sample_cache.py`, on CPU unless
`cache_on_device`); the previous epoch's cache is released first, so the cache never grows. The
class prompts' layer-w tokens (truncated to the longest prompt) are computed once in `setup("fit")`,
since the prompts never change; they are small (classes x ~20 positions x width) and every step reads
them, so they live with the model as buffers. Training steps run only layers w..L-1 of both towers
from those caches, so neither the time nor the activation memory of the first w layers is paid per
step. Validation and test run the full encoders of `CLIPMethod`, with no skipping.

How it plugs into Lightning. `training_inputs()` asks the datamodule for `(index, label)` batches
instead of images (`vlm_adapt/data/inputs.py`, with single-class batches from 4 shots), and only the
epoch cache reads and augments the images - each one once per epoch, from a view seeded by (run seed,
epoch), so a resumed run rebuilds the same tokens. A step looks its tokens up by index at step time,
which keeps it independent of when Lightning creates and prefetches from the loader's iterator (for
the first epoch that happens before `on_train_epoch_start`). A run resumed mid-epoch, which skips
`on_train_epoch_start`, builds the cache in its first step.

Optional token dropping drops a random ratio r ~ U[0, drop_ratio] of the cached patch tokens (the same
positions across the batch, the class token never).

CSkip (class-wise skipping). Prototypes are the normalized final text features of the initial model
(computed once, in `setup("fit")`, which Lightning calls before restoring a checkpoint, so a resumed
run still uses the untrained model's). Per batch, under no_grad, each image feature is compared with
every prototype, the true class's score is set to +inf, each class takes its max over the batch, and
the classes are ranked. The top K = min(ceil(top_ratio * C), max_top) always stay; the class at
rank K + j stays with probability p_j (min-max-normalized exponential pdf of scale `pdf_scale` at C-K
points evenly spaced on [0, 5]); the batch's true classes always stay, even when there are more of
them than K. Only the kept classes run through the text tower; labels are remapped into the kept set.
The image feature CSkip ranks with is the current model's, from the same forward pass as the loss
(detached): it costs nothing extra, it is what the reference code uses, and it ranks the classes the
model being trained confuses each image with. `keep_mask: once` reproduces the reference's single
keep-mask over ranks sampled at the first step and reused for every batch; `batch` (default)
samples it per batch.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any

import torch
from torch import Tensor

from vlm_adapt.backbones import Backbone
from vlm_adapt.backbones.loading import count_parameters
from vlm_adapt.backbones.towers import class_features, normalize
from vlm_adapt.data.inputs import TrainingInputs
from vlm_adapt.data.sample_cache import CacheRequest
from vlm_adapt.data.samplers import single_class_batches
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.registry import CacheSpec, register_method
from vlm_adapt.methods.tasks import ClassificationOutput

log = logging.getLogger(__name__)

KEEP_MASK_MODES = ("batch", "once")
TOKENS_CACHE = "layer_w_tokens"
TOKENS_STREAM = 3_000_000  # random stream of the epoch views (apart from the training loader's)


def drop_patch_tokens(tokens: Tensor, max_ratio: float) -> Tensor:
    """Drop ceil(r * patches) patch tokens, r ~ U[0, max_ratio]; the class token (position 0) always stays.

    The same positions go for every image of the batch, so the batch stays one tensor.
    """
    patches = tokens.shape[1] - 1
    num_drop = math.ceil(torch.rand(()).item() * max_ratio * patches)
    if num_drop == 0:
        return tokens
    kept_patches = torch.randperm(patches)[num_drop:].sort().values + 1
    positions = torch.cat([torch.zeros(1, dtype=torch.long), kept_patches])
    return tokens[:, positions.to(tokens.device)]


def rank_keep_probabilities(num_classes: int, num_top: int, scale: float) -> Tensor:
    """Probability of keeping the class at each rank: 1 for the top `num_top`, then the exponential
    pdf of scale `scale` at C - K points evenly spaced on [0, 5], min-max normalized (1 down to 0).

    A single tail point has no min-max range; it counts as the last point (probability 0), which is
    also what the reference's 0/0 gives.
    """
    tail = num_classes - num_top
    if tail <= 1:
        return torch.cat([torch.ones(num_top), torch.zeros(max(tail, 0))])
    x = torch.linspace(0.0, 5.0, tail, dtype=torch.float64)
    pdf = torch.exp(-x / scale) / scale
    pdf = (pdf - pdf.min()) / (pdf.max() - pdf.min())
    return torch.cat([torch.ones(num_top, dtype=torch.float64), pdf]).float()


class ClassSkipper:
    """CSkip's choice of the classes a batch trains against (see the module docstring)."""

    def __init__(self, num_classes: int, top_ratio: float, max_top: int | None, scale: float, keep_mask: str):
        self.num_classes = num_classes
        num_top = math.ceil(top_ratio * num_classes)
        self.num_top = min(num_top, max_top) if max_top is not None else num_top
        self.keep_probabilities = rank_keep_probabilities(num_classes, self.num_top, scale)
        self.keep_mask = keep_mask
        self._fixed_rank_mask: Tensor | None = None

    def rank_mask(self) -> Tensor:
        """Which ranks stay: sampled per call, or once and reused with `keep_mask: once`."""
        if self.keep_mask == "once":
            if self._fixed_rank_mask is None:
                self._fixed_rank_mask = torch.rand(self.num_classes) < self.keep_probabilities
            return self._fixed_rank_mask
        return torch.rand(self.num_classes) < self.keep_probabilities

    @torch.no_grad()
    def select(self, image_features: Tensor, prototypes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(kept class ids in increasing order, labels remapped to positions in the kept set)."""
        device = labels.device
        if self.num_top >= self.num_classes:
            return torch.arange(self.num_classes, device=device), labels
        scores = normalize(image_features.float()) @ prototypes.float().t()  # (B, C)
        scores[torch.arange(len(labels), device=device), labels] = float("inf")
        ranked = scores.max(dim=0).values.argsort(descending=True)  # ranked[r] = class at rank r
        keep = torch.zeros(self.num_classes, dtype=torch.bool, device=device)
        keep[ranked[self.rank_mask().to(device)]] = True
        keep[labels] = True
        kept = keep.nonzero().squeeze(1)
        position = torch.full((self.num_classes,), -1, dtype=torch.long, device=device)
        position[kept] = torch.arange(len(kept), device=device)
        return kept, position[labels]


@register_method("skip_tuning", caches=(CacheSpec("image tokens at layer w", "epoch", augmented=True,
                                                  name=TOKENS_CACHE),))
class SkipTuning(CLIPMethod):

    def __init__(
        self,
        backbone: Backbone,
        start_layer: int = 6,
        drop_ratio: float = 0.0,
        class_skipping: bool = True,
        top_ratio: float = 0.5,
        max_top: int | None = 50,
        pdf_scale: float = 0.3,
        keep_mask: str = "batch",
        cache_on_device: bool = False,
        cache_batch_size: int = 64,
        batch_size: int = 4,
        single_class_min_shots: int | None = 4,
        **kwargs: Any,
    ):
        """`start_layer`: w, the first trained layer (1..L-1). `drop_ratio`: max ratio of dropped cached
        patch tokens. `class_skipping`, `top_ratio`, `max_top`, `pdf_scale`, `keep_mask`: CSkip.
        `cache_on_device`: keep the image cache on the model's device instead of CPU.
        `cache_batch_size`: batch size of the frozen pass that builds the cache. `batch_size` and
        `single_class_min_shots`: single-class batches of that size when every class has at least that
        many images (null: always ordinary shuffled batches)."""
        check_options(drop_ratio, top_ratio, max_top, pdf_scale, keep_mask, cache_batch_size)
        self.start_layer = start_layer  # read by select_trainable, which CLIPMethod.__init__ calls
        super().__init__(backbone, **kwargs)
        self.drop_ratio = drop_ratio
        self.class_skipping = class_skipping
        self.class_skip_options = {"top_ratio": top_ratio, "max_top": max_top, "scale": pdf_scale,
                                   "keep_mask": keep_mask}
        self.cache_on_device = cache_on_device
        self.cache_batch_size = cache_batch_size
        self.batch_size = batch_size
        self.single_class_min_shots = single_class_min_shots
        # layer-w tokens and end-of-text positions of the training prompts, and CSkip's prototypes
        self.register_buffer("prompt_tokens", None, persistent=False)
        self.register_buffer("prompt_eot", None, persistent=False)
        self.register_buffer("class_prototypes", None, persistent=False)
        self.class_skipper: ClassSkipper | None = None
        trainable, _ = count_parameters(self)
        log.info("Skip Tuning trains %s parameters (layers %d.. of both towers and the heads)",
                 f"{trainable:,}", start_layer)

    # ------------------------------------------------------------ parameters
    def select_trainable(self) -> None:
        layers = min(self.towers.num_image_layers, self.towers.num_text_layers)
        if not 1 <= self.start_layer <= layers - 1:
            raise ConfigError(
                f"method.module.start_layer={self.start_layer} is outside 1..{layers - 1} for this backbone "
                f"({layers} layers per tower); pick the first layer to train, e.g. {layers // 2}."
            )
        for block in self.towers.visual.transformer.resblocks[self.start_layer :]:
            block.requires_grad_(True)
        for block in self.clip.transformer.resblocks[self.start_layer :]:
            block.requires_grad_(True)
        self.clip.ln_final.requires_grad_(True)
        self.towers.visual.ln_post.requires_grad_(True)
        for head in (self.clip.text_projection, self.towers.visual.proj):
            if head is not None:
                head.requires_grad_(True)

    def on_label_spaces_attached(self) -> None:
        # the prompt cache and prototypes belong to the previous training label space
        self.prompt_tokens = self.prompt_eot = self.class_prototypes = None
        self.class_skipper = None
        if self.train_label_space is not None and self.class_skipping:
            self.class_skipper = ClassSkipper(self.train_label_space.num_classes, **self.class_skip_options)

    def training_inputs(self) -> TrainingInputs:
        """(index, label) batches, no image read: a step takes the image's tokens from the epoch cache.
        With `single_class_min_shots` shots or more, each batch comes from one class."""
        if self.single_class_min_shots is None:
            return TrainingInputs(images=False)
        return TrainingInputs(images=False, batch_sampler=partial(
            single_class_batches, batch_size=self.batch_size, min_shots=self.single_class_min_shots))

    def cache_requests(self) -> list[CacheRequest]:
        """Layer-w tokens of every training image, rebuilt each epoch from that epoch's augmentation."""
        return [CacheRequest(TOKENS_CACHE, self.frozen_image_tokens, "epoch", TOKENS_STREAM,
                             batch_size=self.cache_batch_size, on_device=self.cache_on_device)]

    # ------------------------------------------------------------ Lightning wiring
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.prompt_tokens is None:
            self.cache_class_prompts()

    # ------------------------------------------------------------ caches
    @torch.no_grad()
    def frozen_image_tokens(self, images: Tensor) -> Tensor:
        """Layer-w tokens: embeddings and the frozen resblocks 0..w-1, without an autograd graph."""
        return self.towers.image_layers(self.towers.image_tokens(images), 0, self.start_layer)

    @torch.no_grad()
    def cache_class_prompts(self) -> None:
        """Layer-w tokens of the training prompts (truncated to the longest) and CSkip's prototypes."""
        space = self.train_label_space
        if space is None:
            raise RuntimeError("attach_label_spaces(train, test) must come before Skip Tuning's prompt cache")
        tokens = self.tokenizer(space.prompts()).to(self.device)
        eot = self.towers.eot_index(tokens)
        length = self.towers.text_length(eot)
        layer_w, final = [], []
        chunk = self.hparams.text_chunk_size
        for chunk_tokens, chunk_eot in zip(tokens[:, :length].split(chunk), eot.split(chunk)):
            x = self.towers.text_embeddings(self.towers.token_embeddings(chunk_tokens), length)
            x = self.towers.text_layers(x, 0, self.start_layer)
            layer_w.append(x)
            final.append(self.towers.text_head(self.towers.text_layers(x, self.start_layer), chunk_eot))
        self.prompt_tokens = torch.cat(layer_w)
        self.prompt_eot = eot
        self.class_prototypes = class_features(torch.cat(final), len(space.templates))

    # ------------------------------------------------------------ training from the caches
    def select_classes(self, image_features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """CSkip: (kept class ids, labels in the kept set); every class when class skipping is off."""
        if self.class_skipper is None:
            return torch.arange(self.train_label_space.num_classes, device=labels.device), labels
        return self.class_skipper.select(image_features.detach(), self.class_prototypes, labels)

    def cached_class_features(self, classes: Tensor) -> Tensor:
        """(K, D) normalized text features of `classes`: layers w..L-1 from the prompt cache, run only up
        to the longest kept prompt (the tower is causal, so shorter runs give the same features)."""
        num_templates = len(self.train_label_space.templates)
        template = torch.arange(num_templates, device=classes.device)
        prompts = (classes[:, None] * num_templates + template).flatten()
        eot = self.prompt_eot[prompts]
        x = self.prompt_tokens[prompts, : self.towers.text_length(eot)]
        features = self.towers.text_head(self.towers.text_layers(x, self.start_layer), eot)
        return class_features(features, num_templates)

    def cached_forward(self, tokens: Tensor, labels: Tensor) -> ClassificationOutput:
        """A batch of cached layer-w image tokens through layers w.. against the kept classes."""
        if self.drop_ratio > 0:
            tokens = drop_patch_tokens(tokens, self.drop_ratio)
        image_features = self.towers.image_head(self.towers.image_layers(tokens, self.start_layer))
        classes, targets = self.select_classes(image_features, labels)
        text_features = self.cached_class_features(classes)
        logits = self.logits(image_features, text_features)
        return ClassificationOutput(logits, targets, text_features, labels, classes=classes,
                                    logs={"train/kept_classes": float(len(classes))})

    def cached_loss(self, tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, kept class ids, logits over the kept classes) of a batch of cached layer-w image tokens."""
        out = self.cached_forward(tokens, labels)
        return self.training_loss(out.logits, out.targets, out.text_features), out.classes, out.logits

    def classification_forward(self, batch: tuple[Tensor, Tensor]) -> ClassificationOutput:
        """A training batch is (cache indices, labels): the epoch's cached layer-w tokens of those images."""
        indices, labels = batch
        tokens = self.sample_caches.rows(TOKENS_CACHE, indices, self.device, self.current_epoch)
        return self.cached_forward(tokens, labels)

def check_options(
    drop_ratio: float, top_ratio: float, max_top: int | None, pdf_scale: float, keep_mask: str,
    cache_batch_size: int,
) -> None:
    """Clear errors for option values Skip Tuning cannot use."""
    problems = []
    if not 0.0 <= drop_ratio < 1.0:
        problems.append(f"drop_ratio={drop_ratio} must be in [0, 1)")
    if not 0.0 < top_ratio <= 1.0:
        problems.append(f"top_ratio={top_ratio} must be in (0, 1]")
    if max_top is not None and max_top < 1:
        problems.append(f"max_top={max_top} must be at least 1 (or null for no cap)")
    if pdf_scale <= 0:
        problems.append(f"pdf_scale={pdf_scale} must be positive")
    if keep_mask not in KEEP_MASK_MODES:
        problems.append(f"keep_mask={keep_mask!r} must be one of {KEEP_MASK_MODES}")
    if cache_batch_size < 1:
        problems.append(f"cache_batch_size={cache_batch_size} must be at least 1")
    if problems:
        raise ConfigError("Skip Tuning options: " + "; ".join(problems) + " (set them under method.module).")
