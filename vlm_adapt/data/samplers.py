"""Batch samplers for methods that need special training batches.

`SingleClassBatchSampler` draws every batch from one class, as Skip Tuning's reference code does
with 4 or more shots (batches of 4 images of the same class). Every image appears exactly once per
epoch: each class's images are shuffled and cut into batches (the last one of a class may be
smaller), and the order of all batches is shuffled. The reference instead picks a random class for
each batch and drops a class's remainder; the batches it yields are the same kind.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler


def dataset_labels(dataset: Any) -> list[int]:
    """Labels of a dataset holding `items` with a `label` (ImageListDataset and its wrappers)."""
    items = getattr(dataset, "items", None)
    if items is None:
        name = type(dataset).__name__
        raise TypeError(f"{name} has no `items`; single-class batches need each image's label")
    return [item.label for item in items]


class SingleClassBatchSampler(Sampler[list[int]]):
    """Batches of up to `batch_size` indices, all of one class; each index once per epoch."""

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ):
        """`generator`: source of the shuffles; by default a seed is drawn from torch's global RNG
        at every epoch (as torch's RandomSampler does), so `seed_everything` makes runs repeatable.
        `drop_last`: drop each class's partial batch when that class has a full one (the reference drops
        a class's remainder; like Dassl's rule for ordinary batches, a class smaller than a batch keeps it)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.generator = generator
        by_class: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(labels):
            by_class[int(label)].append(index)
        self.class_indices = [torch.tensor(indices) for _, indices in sorted(by_class.items())]

    def __len__(self) -> int:
        return sum(self._batches_of(len(indices)) for indices in self.class_indices)

    def _batches_of(self, size: int) -> int:
        if self.drop_last and size >= self.batch_size:
            return size // self.batch_size
        return -(-size // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = self.generator
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        batches: list[list[int]] = []
        for indices in self.class_indices:
            shuffled = indices[torch.randperm(len(indices), generator=generator)]
            chunks = shuffled.split(self.batch_size)[: self._batches_of(len(indices))]
            batches.extend(chunk.tolist() for chunk in chunks)
        for position in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[position]


def single_class_batches(
    dataset: Any, batch_size: int, min_shots: int, drop_last: bool = False
) -> SingleClassBatchSampler | None:
    """Single-class batches when every class has at least `min_shots` training images, else None
    (the datamodule then uses ordinary shuffled batches). For a K-shot sample the fewest images
    of a class is K, so this is the reference's "shots >= 4" rule."""
    counts = Counter(dataset_labels(dataset))
    if not counts or min(counts.values()) < min_shots:
        return None
    return SingleClassBatchSampler(dataset_labels(dataset), batch_size, drop_last=drop_last)
