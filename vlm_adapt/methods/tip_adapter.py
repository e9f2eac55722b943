"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): a key-value cache of the few-shot images.

Cache model. Keys K (N x D): each training image's CLIP feature averaged over `augment_epoch` (10)
augmented views (random resized crop at scale 0.5-1, flip), then L2-normalized; values V (N x C):
the one-hot labels. For an image with normalized feature f,

    logits = clip_scale * f W^T + alpha * exp(-beta (1 - f K^T)) V

where W holds the zero-shot class text features and `clip_scale` is the reference's fixed 100.

Tip-Adapter (`tip_adapter`, training-free, fitted in closed form): the cache is built, then alpha and
beta are searched on the validation features over the reference's grid (`search_scale`, `search_step`:
`step` points from 0.1 towards `scale`, beta outer, alpha inner, the first best kept). Test images never
reach the search. Tip-Adapter-F (`tip_adapter_f`): the keys are the weights of a trainable linear layer
initialised from the cache (N x D parameters) and trained with cross-entropy on the logits above, with
the initial alpha and beta, AdamW and a per-step cosine; then the same search on validation.

How it plugs into the loop. The cache needs each training image's own views, so it is the shared cache
service's `keys` cache (`vlm_adapt/data/sample_cache.py`): the training images with the reference's
augmentation, read `augment_epoch` times in dataset order and averaged (built at `on_train_start`, once
the model is on its device). Collecting the views through `observe` over epochs is not possible: the
task's training batches are shuffled and carry no dataset index, so the views of one image could not be
averaged. The training batches are therefore `(index, label)` pairs with no image read
(`training_inputs`): the training-free variant ignores them, Tip-Adapter-F looks each image's feature up
in the service's per-epoch `epoch_views` cache of one fresh augmented view per training image (the
encoder is frozen, so this is the reference's per-step encoding, done once per image and epoch). Every
view is drawn from a generator seeded by the run's seed and the view (or epoch), with the global random
state forked, so each DDP rank builds the same cache and a resumed run the same epoch. Validation
features come from the task's `observe("val", ...)` (training-free) or from `on_validation_batch_end`
(-F, whose validation steps are the ordinary ones); they are gathered over ranks before the search.

Checkpoints hold the keys, the values, alpha and beta (`checkpoint_state_names`), so a checkpoint
evaluates to exactly the logits of the run that wrote it. Memory: the keys are N x D, the values
N x C, and the search holds the validation-by-cache affinity (M x N).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import transforms as T

from vlm_adapt.backbones import Backbone
from vlm_adapt.backbones.towers import normalize
from vlm_adapt.data.inputs import TrainingInputs
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.data.sample_cache import CacheRequest
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.registry import CacheSpec, register_method
from vlm_adapt.methods.tasks import ClassificationOutput

log = logging.getLogger(__name__)

# random streams of the cache views and of Tip-Adapter-F's per-epoch views (apart from the loader's)
KEY_VIEW_STREAM = 1_000_000
EPOCH_VIEW_STREAM = 2_000_000

KEYS_CACHE = CacheSpec("cache keys: each training image's feature averaged over augment_epoch augmented views "
                       "(drawn once, seeded), normalized; values: one-hot labels", "once", augmented=False,
                       name="keys")
EPOCH_VIEWS_CACHE = CacheSpec("normalized features of one augmented view of every training image", "epoch",
                              augmented=True, name="epoch_views")


def tip_logits(
    features: Tensor, text_features: Tensor, keys: Tensor, values: Tensor,
    alpha: float | Tensor, beta: float | Tensor, clip_scale: float = 100.0,
) -> Tensor:
    """clip_scale * f W^T + alpha * exp(-beta (1 - f K^T)) V, for normalized features f (B, D), class text
    features W (C, D), cache keys K (N, D) and values V (N, C); written as the reference computes it."""
    features = features.to(keys.dtype)
    affinity = features @ keys.t()
    cache_logits = (-1 * (beta - beta * affinity)).exp() @ values.to(affinity.dtype)
    clip_logits = clip_scale * features @ text_features.to(keys.dtype).t()
    return clip_logits + cache_logits * alpha


def search_grid(scale: float, steps: int) -> list[float]:
    """The reference's grid: `steps` values from 0.1 towards (not reaching) `scale`."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


@torch.no_grad()
def search_alpha_beta(
    affinity: Tensor, clip_logits: Tensor, values: Tensor, labels: Tensor, betas: list[float], alphas: list[float],
) -> tuple[float, float, int]:
    """(beta, alpha, correct): the grid point with the most correct predictions, the first one in the
    reference's order (beta outer, alpha inner) on ties. `affinity` (M, N) = f K^T and `clip_logits`
    (M, C) of the M validation images."""
    alpha_column = torch.tensor(alphas, dtype=clip_logits.dtype, device=clip_logits.device)[:, None, None]
    correct = torch.empty(len(betas), len(alphas), dtype=torch.long)
    for i, beta in enumerate(betas):
        cache_logits = (-1 * (beta - beta * affinity)).exp() @ values.to(affinity.dtype)
        logits = clip_logits[None] + cache_logits[None] * alpha_column  # (alphas, M, C)
        correct[i] = (logits.argmax(dim=-1) == labels[None]).sum(dim=-1).cpu()
    best = int((correct.flatten() == correct.max()).nonzero()[0])
    i, j = divmod(best, len(alphas))
    return betas[i], alphas[j], int(correct[i, j])


def tip_train_transform(preprocess_cfg: dict[str, Any], crop_scale: tuple[float, float]) -> T.Compose:
    """The reference's augmentation: bicubic random resized crop at `crop_scale` (0.5-1), flip, CLIP's
    normalization (size, mean and std from the backbone's open_clip preprocessing config)."""
    size = preprocess_cfg["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    return T.Compose([
        T.RandomResizedCrop(size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=0.5),
        T.ToTensor(),
        T.Normalize(tuple(preprocess_cfg["mean"]), tuple(preprocess_cfg["std"])),
    ])


@register_method("tip_adapter", fit="closed_form", caches=(KEYS_CACHE,))
class TipAdapter(CLIPMethod):

    def __init__(
        self,
        backbone: Backbone,
        init_alpha: float = 1.17,
        init_beta: float = 1.0,
        search: bool = True,
        search_scale: tuple[float, float] = (7.0, 3.0),
        search_step: tuple[int, int] = (200, 20),
        augment_epoch: int = 10,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        clip_scale: float = 100.0,
        cache_batch_size: int = 256,
        templates: list[str] | None = None,
        **kwargs: Any,
    ):
        """`init_alpha`, `init_beta`: the values before the search (and Tip-Adapter-F's while training);
        `search`: search them on validation (the reference's `search_hp`); `search_scale`, `search_step`:
        [beta, alpha] grid ranges and sizes (the reference's order);
        `augment_epoch`: augmented views averaged into each key; `crop_scale`: the views' crop scale;
        `clip_scale`: the zero-shot logits' scale; `templates`: prompt templates to ensemble instead of
        each dataset's own (the reference's seven for ImageNet)."""
        check_options(search_scale, search_step, augment_epoch, crop_scale, cache_batch_size)
        super().__init__(backbone, **kwargs)
        self.automatic_optimization = self.spec.fit == "gradient"
        self.embed_dim = self.clip.visual.output_dim
        self._set_keys(torch.zeros(0, self.embed_dim))
        self.register_buffer("cache_values", torch.zeros(0, 0))
        self.register_buffer("alpha", torch.tensor(float(init_alpha)))
        self.register_buffer("beta", torch.tensor(float(init_beta)))
        self._val_parts: list[tuple[Tensor, Tensor]] = []
        self._val_complete = False

    # ------------------------------------------------------------ the cache
    def _set_keys(self, keys: Tensor) -> None:
        """The keys are a buffer here; Tip-Adapter-F makes them a trainable parameter."""
        self.register_buffer("cache_keys", keys)

    def allocate_cache(self, num_items: int, num_classes: int) -> None:
        """Zero keys (N, D) and values (N, C), filled by `build_cache` (or loaded from a checkpoint)."""
        like = self.alpha
        self._set_keys(torch.zeros(num_items, self.embed_dim, dtype=like.dtype, device=like.device))
        self.cache_values = torch.zeros(num_items, num_classes, dtype=like.dtype, device=like.device)

    @property
    def cache_built(self) -> bool:
        return self.cache_values.numel() > 0 and bool(self.cache_values.any())

    def checkpoint_state_names(self) -> set[str]:
        return super().checkpoint_state_names() | {"cache_keys", "cache_values", "alpha", "beta"}

    def training_inputs(self) -> TrainingInputs:
        """(index, label) batches, no image read: the cache and -F's epoch features are read by index."""
        return TrainingInputs(images=False)

    def view_transform(self) -> T.Compose:
        """The reference's augmentation of the cache views."""
        return tip_train_transform(self.clip.visual.preprocess_cfg, self.hparams.crop_scale)

    def cache_requests(self) -> list[CacheRequest]:
        """The keys: `augment_epoch` views of every training image, averaged in float32."""
        return [CacheRequest("keys", lambda images: self.towers.encode_image(images).float(), "once",
                             KEY_VIEW_STREAM, views=self.hparams.augment_epoch, transform=self.view_transform(),
                             batch_size=self.hparams.cache_batch_size, on_device=True)]

    @torch.no_grad()
    def build_cache(self) -> None:
        """Keys: the mean of `augment_epoch` views' features, normalized; values: one-hot labels."""
        built = self.sample_caches.build("keys", self.device)
        self.sample_caches.release("keys")  # the keys live on as the model's tensor
        keys = normalize(built.values)
        values = F.one_hot(built.labels.long().to(self.device), self.train_label_space.num_classes)
        if keys.shape != self.cache_keys.shape or values.shape != self.cache_values.shape:
            self.allocate_cache(len(keys), values.shape[1])
        self.cache_keys.data.copy_(keys)  # in place: Tip-Adapter-F's optimizer already holds the parameter
        self.cache_values.copy_(values)

    # ------------------------------------------------------------ Lightning wiring
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.spec.fit == "closed_form" and self.trainer.world_size > 1:
            # DDP refuses a module with nothing to train; the cache is one frozen pass over the few shots
            raise ConfigError(f"method={self.method_name} trains nothing and runs on one device: use "
                              "trainer.devices=1 (or trainer=gpu / trainer=cpu), or method=tip_adapter_f.")
        if stage == "fit":  # before the optimizer is built and a checkpoint restored into the tensors
            self.allocate_cache(self.sample_caches.num_samples, self.train_label_space.num_classes)
            self._val_parts, self._val_complete = [], False

    def on_train_start(self) -> None:
        if not self.cache_built:  # a resumed run has its (trained) cache from the checkpoint
            self.build_cache()

    def configure_optimizers(self) -> Any:
        return None  # training-free: the cache is built and alpha, beta searched

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        keys, values = checkpoint["state_dict"]["cache_keys"], checkpoint["state_dict"]["cache_values"]
        if keys.shape != self.cache_keys.shape or values.shape != self.cache_values.shape:
            self.allocate_cache(*values.shape)  # `vlm-adapt eval`: shapes come from the checkpoint

    # ------------------------------------------------------------ logits
    def encode_label_space(self, space: LabelSpace) -> Tensor:
        return super().encode_label_space(space.with_templates(self.hparams.templates))

    def supports_label_space(self, space: LabelSpace) -> bool:
        """The cache's values are the training classes: only that label space is scored."""
        return self.train_label_space is not None and space.classnames == self.train_label_space.classnames

    def image_features(self, images: Tensor) -> Tensor:
        return normalize(self.encode_images(images))

    def cache_logits(self, features: Tensor, alpha: float | Tensor, beta: float | Tensor) -> Tensor:
        """Tip-Adapter's logits of normalized image features against the training label space."""
        text = self.class_text_features(self.train_label_space)
        return tip_logits(features, text, self.cache_keys, self.cache_values, alpha, beta, self.hparams.clip_scale)

    def forward(self, images: Tensor, space: LabelSpace) -> Tensor:
        return self.cache_logits(self.image_features(images), self.alpha, self.beta)

    # ------------------------------------------------------------ alpha and beta, on validation only
    def observe(self, split: str, images: Tensor, labels: Tensor) -> None:
        """The task shows the validation images here (training batches are (index, label): ignored)."""
        if split == "val":
            self.collect_validation(images, labels)

    @torch.no_grad()
    def collect_validation(self, images: Tensor, labels: Tensor) -> None:
        """Keep the validation features (the encoder is frozen: collected once per process)."""
        if not self._val_complete:
            self._val_parts.append((self.image_features(images).float(), labels))

    def on_validation_epoch_end(self) -> None:
        if self._val_parts and not self.trainer.sanity_checking:
            self._val_complete = True

    def _gathered_validation(self) -> tuple[Tensor, Tensor] | None:
        if not self._val_parts:
            return None
        features = torch.cat([f for f, _ in self._val_parts])
        labels = torch.cat([y for _, y in self._val_parts])
        return gather_rows(self, features), gather_rows(self, labels)

    @torch.no_grad()
    def fit_alpha_beta(self) -> None:
        """The reference's grid search of (beta, alpha) on the validation features; logged as val/alpha,
        val/beta and val/acc (the searched model's validation accuracy)."""
        val = self._gathered_validation() if self.hparams.search else None
        if val is None:
            if self.hparams.search:
                log.warning("%s: no validation images, alpha and beta keep their initial values (%.4g, %.4g)",
                            self.method_name, float(self.alpha), float(self.beta))
        else:
            features, labels = val
            keys = self.cache_keys.detach().float()
            text = self.class_text_features(self.train_label_space).float()
            clip_logits = self.hparams.clip_scale * features @ text.t()
            beta, alpha, correct = search_alpha_beta(
                features @ keys.t(), clip_logits, self.cache_values.float(), labels,
                search_grid(self.hparams.search_scale[0], self.hparams.search_step[0]),
                search_grid(self.hparams.search_scale[1], self.hparams.search_step[1]),
            )
            self.alpha.fill_(alpha)
            self.beta.fill_(beta)
            self.log("val/acc", correct / len(labels))
        self.log("val/alpha", float(self.alpha))
        self.log("val/beta", float(self.beta))

    def on_train_epoch_end(self) -> None:
        self.fit_alpha_beta()


@register_method("tip_adapter_f", caches=(KEYS_CACHE, EPOCH_VIEWS_CACHE))
class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: the cache keys train (N x D parameters); alpha and beta are searched afterwards."""

    def _set_keys(self, keys: Tensor) -> None:
        self.cache_keys = nn.Parameter(keys)

    def configure_optimizers(self) -> Any:
        return CLIPMethod.configure_optimizers(self)

    def cache_requests(self) -> list[CacheRequest]:
        """The keys, and every epoch one fresh view of every training image, normalized."""
        epoch_views = CacheRequest("epoch_views", lambda images: normalize(self.towers.encode_image(images).float()),
                                   "epoch", EPOCH_VIEW_STREAM, transform=self.view_transform(),
                                   batch_size=self.hparams.cache_batch_size, on_device=True)
        return [*super().cache_requests(), epoch_views]

    def classification_forward(self, batch: tuple[Tensor, Tensor]) -> ClassificationOutput:
        """A training batch is (indices, labels): their epoch features through the cache model, trained
        with the initial alpha and beta (as the reference)."""
        indices, labels = batch
        features = self.sample_caches.rows("epoch_views", indices, self.device, self.current_epoch)
        logits = self.cache_logits(features, self.hparams.init_alpha, self.hparams.init_beta)
        return ClassificationOutput(logits, labels, self.class_text_features(self.train_label_space), labels)

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.trainer.sanity_checking:
            context = self.trainer.precision_plugin.forward_context()
            with context:
                self.collect_validation(*batch)

    def on_train_epoch_end(self) -> None:
        trainer = self.trainer
        last = (trainer.current_epoch + 1 >= (trainer.max_epochs or 1)
                or 0 < trainer.max_steps <= trainer.global_step or trainer.should_stop)
        if last:  # the reference searches once, after training
            self.fit_alpha_beta()


def gather_rows(module: CLIPMethod, x: Tensor) -> Tensor:
    """`x` (rows, ...) of every rank concatenated; ranks may hold different numbers of rows."""
    if module._trainer is None or module.trainer.world_size == 1:
        return x
    sizes = module.all_gather(torch.tensor([len(x)], device=x.device)).flatten().tolist()
    padded = torch.cat([x, x.new_zeros((max(sizes) - len(x), *x.shape[1:]))])
    gathered = module.all_gather(padded)
    return torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)])


def check_options(
    search_scale: tuple[float, float], search_step: tuple[int, int], augment_epoch: int,
    crop_scale: tuple[float, float], cache_batch_size: int,
) -> None:
    """Clear errors for option values Tip-Adapter cannot use."""
    problems = []
    if len(search_scale) != 2 or min(search_scale) <= 0.1:
        problems.append(f"search_scale={list(search_scale)} must be [beta, alpha] ranges above 0.1")
    if len(search_step) != 2 or min(search_step) < 1:
        problems.append(f"search_step={list(search_step)} must be [beta, alpha] grid sizes of at least 1")
    if augment_epoch < 1:
        problems.append(f"augment_epoch={augment_epoch} must be at least 1")
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        problems.append(f"crop_scale={list(crop_scale)} must be [low, high] with 0 < low <= high <= 1")
    if cache_batch_size < 1:
        problems.append(f"cache_batch_size={cache_batch_size} must be at least 1")
    if problems:
        raise ConfigError("Tip-Adapter options: " + "; ".join(problems) + " (set them under method.module).")
