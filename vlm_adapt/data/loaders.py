"""The training loader: its shuffle and worker seeds depend only on the run's seed and the epoch.

Torch's loader draws the data order and the workers' base seed from torch's global random stream,
at a point of Lightning's loop that differs between the first epoch of a fit and the later ones. A run
resumed from an epoch's checkpoint would then see other batches and other augmentations than the
uninterrupted run. `EpochSeededLoader` re-seeds its own generator from (seed, epoch) each time an
epoch's iterator is made, and its workers are not persistent (a persistent worker carries its random
state from one epoch to the next), so epoch e is the same in every run of a seed, resumed or not,
with or without workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for `epoch` of a run seeded `seed`."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)]).generate_state(2, np.uint64)[0] >> 1)


class EpochSeededLoader(DataLoader):
    """A DataLoader whose generator is re-seeded from (`seed`, `epoch_fn()`) when an epoch starts.

    The generator drives the shuffle (torch's RandomSampler, or a batch sampler with a `generator`
    attribute left unset) and the workers' base seed (their augmentation streams).
    """

    def __init__(self, *args: Any, seed: int, epoch_fn: Callable[[], int], **kwargs: Any):
        kwargs["generator"] = torch.Generator()
        kwargs["persistent_workers"] = False
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.epoch_fn = epoch_fn
        batch_sampler = kwargs.get("batch_sampler")
        if batch_sampler is not None and getattr(batch_sampler, "generator", ...) is None:
            batch_sampler.generator = self.generator

    def __iter__(self) -> Iterator[Any]:
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch_fn()))
        return super().__iter__()
