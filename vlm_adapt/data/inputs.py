"""What a method's training batches hold, declared by the method and served by the datamodule.

A method never changes the datamodule: it answers `training_inputs()`, and the classification
datamodule builds its training loader from that answer. Batches are `(images, labels)` by default;
`(index, images, labels)` for a method that caches per-image work keyed by dataset index (UniPT's
hidden states); `(index, labels)` without reading any image for a method that trains from its own
per-epoch cache of the images (Skip Tuning); and a batch sampler where a method needs special batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset, Sampler


@dataclass(frozen=True)
class TrainingInputs:
    images: bool = True  # False: (index, label) samples; the method reads its own cache of the images
    index: bool = False  # (index, image, label) samples: the index keys a per-image cache
    # dataset, drop_last -> batch sampler (or None: ordinary shuffled batches)
    batch_sampler: Callable[..., Sampler | None] | None = None


class IndexedDataset(Dataset):
    """Prefixes every sample of `dataset` with its index: (index, *sample), the key of a feature cache."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.items = getattr(dataset, "items", None)  # labels, for batch samplers

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        return (index, *self.dataset[index])


class IndexedLabels(Dataset):
    """The training set as (index, label) pairs, no image read: a step takes image `index` from a cache."""

    def __init__(self, dataset: Dataset):
        self.items = dataset.items  # labels, for batch samplers

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, self.items[index].label


def training_set(dataset: Dataset, inputs: TrainingInputs) -> Dataset:
    """`dataset` (yielding (image, label)) shaped as `inputs` asks."""
    if not inputs.images:
        return IndexedLabels(dataset)
    return IndexedDataset(dataset) if inputs.index else dataset
