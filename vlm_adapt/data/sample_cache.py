"""One service that builds and serves what a method computes from every training image before it trains.

A method declares its caches in the registry (`CacheSpec(what, refresh, augmented, name)`) and says how
each is computed by returning `CacheRequest`s from `cache_requests()`: the frozen function of a batch of
images, how many augmented views are averaged, with which transform. `SampleCaches` (one per model,
bound to the run's datamodule in `setup("fit")` by `CLIPMethod`) reads the training images in dataset
order, runs the function under no_grad and the trainer's precision, and keeps one row per training
image; a training batch of dataset indices looks its rows up (`TrainingInputs(images=False)` batches).

- `refresh="once"`: built at the first request and kept (Tip-Adapter's keys, 10 views averaged);
- `refresh="epoch"`: rebuilt for every epoch, the previous epoch's rows released first so memory never
  holds two (Skip Tuning's layer-w tokens, Tip-Adapter-F's per-epoch view). `CLIPMethod` builds them at
  the epoch start, so step times exclude them; a run resumed mid-epoch builds at its first step.

Every view's randomness comes from a generator seeded by (run seed, the request's stream, view or epoch)
with the global random state forked, so every DDP rank builds the same rows and a resumed run the same
epoch. Lightning's own iterators are untouched: the cache has its own loader over the same images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vlm_adapt.data.loaders import epoch_seed
from vlm_adapt.errors import ConfigError

REFRESH = ("once", "epoch")


@dataclass(frozen=True)
class CacheRequest:
    """How one declared cache is computed."""

    name: str  # the CacheSpec's name in the method's registration
    encode: Callable[[Tensor], Tensor]  # (B, 3, H, W) images on the model's device -> (B, ...) rows
    refresh: str  # "once" or "epoch", as declared
    stream: int  # random stream of its views (apart from the loader's and other caches')
    views: int = 1  # augmented views per image; more than one are averaged in float32
    transform: Callable[[Any], Tensor] | None = None  # None: the datamodule's training augmentation
    batch_size: int = 64
    on_device: bool = False  # keep the rows on the model's device (else on CPU)
    dtype: torch.dtype | None = None  # storage dtype (None: as computed; float32 when views are averaged)


@dataclass
class CachedRows:
    values: Tensor  # (N, ...) one row per training image, in dataset order
    labels: Tensor  # (N,) the images' labels
    epoch: int | None  # the epoch an "epoch" cache was built for
    seconds: float  # time its build took


def encode_view(dataset: Dataset, request: CacheRequest, seed: int, device: torch.device,
                num_workers: int, context: Any) -> tuple[Tensor, Tensor]:
    """(rows (N, ...) on the request's storage device, labels (N,)) of one view of every image of
    `dataset`, in dataset order; the view's randomness comes from `seed` alone."""
    storage = device if request.on_device else torch.device("cpu")
    loader = DataLoader(dataset, batch_size=request.batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed))
    rows, labels, start = None, torch.empty(len(dataset), dtype=torch.long), 0
    with torch.random.fork_rng(devices=[]), torch.no_grad(), context:
        torch.manual_seed(seed)  # the augmentation's stream when the main process reads the images
        for images, targets in loader:
            out = request.encode(images.to(device))
            if rows is None:  # allocated once the row shape is known, filled in place
                rows = torch.empty((len(dataset), *out.shape[1:]), dtype=request.dtype or out.dtype, device=storage)
            rows[start : start + len(out)] = out
            labels[start : start + len(out)] = targets
            start += len(out)
    return rows, labels


class SampleCaches:
    """The caches one model requested, built from the training images of the datamodule it is bound to."""

    def __init__(self, requests: list[CacheRequest], declared: dict[str, str]):
        """`declared`: {cache name: refresh} from the method's registration; every request must be one."""
        for request in requests:
            if declared.get(request.name) != request.refresh:
                raise TypeError(f"cache {request.name!r} ({request.refresh}) is not declared with that refresh "
                                f"in the method's @register_method(caches=...): {declared}")
            if request.views < 1:
                raise ConfigError(f"cache {request.name!r}: at least one view per image, got {request.views}")
        self.requests = {request.name: request for request in requests}
        self._rows: dict[str, CachedRows] = {}
        self._source: Any = None
        self._context: Callable[[], Any] = nullcontext

    def __bool__(self) -> bool:
        return bool(self.requests)

    def bind(self, datamodule: Any, trainer: Any = None, method_name: str = "this method") -> None:
        """Take the training images from `datamodule` (its `train_dataset(transform)`), dropping old rows."""
        if not hasattr(datamodule, "train_dataset"):
            raise ConfigError(
                f"{method_name} builds caches from the training images and needs vlm_adapt's "
                "ClassificationDataModule: call trainer.fit(model, datamodule=ClassificationDataModule(...))."
            )
        self._source = datamodule
        if trainer is not None:
            self._context = trainer.precision_plugin.forward_context
        self._rows.clear()

    @property
    def num_samples(self) -> int:
        return len(self._dataset(None))

    def _dataset(self, transform: Callable | None) -> Dataset:
        if self._source is None:
            raise RuntimeError("the sample caches are not bound to a datamodule: fit the model with one")
        return self._source.train_dataset(transform)

    def _seed(self, request: CacheRequest, index: int) -> int:
        return epoch_seed(getattr(self._source, "seed", 0), request.stream + index)

    def build(self, name: str, device: torch.device, epoch: int = 0) -> CachedRows:
        """Compute cache `name` now (for `epoch` if it is refreshed per epoch), replacing what it held."""
        request = self.requests[name]
        self._rows.pop(name, None)  # release the previous rows before computing new ones
        started = time.perf_counter()
        dataset = self._dataset(request.transform)
        num_workers = getattr(self._source, "num_workers", 0)
        first = epoch * request.views if request.refresh == "epoch" else 0

        def view(index: int) -> tuple[Tensor, Tensor]:
            return encode_view(dataset, request, self._seed(request, first + index), device, num_workers,
                               self._context())

        values, labels = view(0)
        if request.views > 1:  # the float32 mean of the views, each released once added
            values = values.to(torch.float32, copy=True)
            for index in range(1, request.views):
                values += view(index)[0].float()
            values /= request.views
        built = CachedRows(values, labels, epoch if request.refresh == "epoch" else None,
                           time.perf_counter() - started)
        self._rows[name] = built
        return built

    def get(self, name: str, device: torch.device, epoch: int = 0) -> CachedRows:
        """Cache `name`, built first when missing or (per-epoch caches) built for another epoch."""
        rows = self._rows.get(name)
        stale = rows is None or (self.requests[name].refresh == "epoch" and rows.epoch != epoch)
        return self.build(name, device, epoch) if stale else rows

    def rows(self, name: str, index: Tensor, device: torch.device, epoch: int = 0) -> Tensor:
        """The rows of the training images `index`, on `device`."""
        values = self.get(name, device, epoch).values
        return values[index.to(values.device)].to(device, non_blocking=True)

    def put(self, name: str, values: Tensor, labels: Tensor, epoch: int | None = None) -> None:
        """Serve `values` as cache `name` (for `epoch`) without computing it, e.g. rows restored elsewhere."""
        self._rows[name] = CachedRows(values, labels, epoch, 0.0)

    def built(self, name: str) -> CachedRows | None:
        return self._rows.get(name)

    def release(self, name: str | None = None) -> None:
        """Free cache `name` (every cache when None)."""
        if name is None:
            self._rows.clear()
        else:
            self._rows.pop(name, None)

    def per_epoch(self) -> list[str]:
        return [name for name, request in self.requests.items() if request.refresh == "epoch"]
