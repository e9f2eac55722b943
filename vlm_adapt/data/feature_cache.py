"""Frozen-backbone outputs kept per sample across epochs, and the dataset wrapper that supplies the keys.

A method whose backbone is frozen and deterministic (UniPT) computes each training sample's hidden
states once and reads them back in later epochs, instead of re-running the backbone. That is only
valid when a sample's input is the same every epoch, i.e. without training augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vlm_adapt.errors import ConfigError


@dataclass
class TowerStates:
    """A batch of one tower's frozen outputs: every layer's tokens plus the final pooled feature."""

    layers: list[Tensor]  # L + 1 tensors (N, T, width): the embedding output, then each resblock's output
    lengths: Tensor  # (N,) real tokens per sample (text: up to and including the end-of-text token)
    pool_index: Tensor  # (N,) position of the pooled token (the class token 0, or the end-of-text token)
    pooled: Tensor  # (N, embed_dim) the frozen final feature (CLS or EOT, after the head's projection)

    def to(self, device: torch.device) -> TowerStates:
        return TowerStates(
            [layer.to(device) for layer in self.layers], self.lengths.to(device), self.pool_index.to(device),
            self.pooled.to(device),
        )


class FeatureCache:
    """`TowerStates` per sample index, stored on `device` (None: where the states were computed) in `dtype`.

    Each sample keeps only its real tokens; `get` pads a batch back to its longest sample.
    `max_gb` bounds the projected size (first batch's bytes per sample x `num_samples`): a cache
    that would not fit fails at the first step with the options to fix it, not hours later.
    """

    def __init__(
        self,
        name: str,
        num_samples: int,
        device: str | torch.device | None = "cpu",
        dtype: torch.dtype | None = None,
        max_gb: float | None = None,
    ):
        self.name = name
        self.num_samples = num_samples
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.max_gb = max_gb
        self._entries: dict[int, tuple[Tensor, int, Tensor]] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, index: int) -> bool:
        return index in self._entries

    def missing(self, index: list[int]) -> list[int]:
        """Batch rows whose sample is not cached yet (the first row of each repeated sample)."""
        rows, seen = [], set()
        for row, key in enumerate(index):
            if key not in self._entries and key not in seen:
                seen.add(key)
                rows.append(row)
        return rows

    def put(self, index: list[int], states: TowerStates) -> None:
        """Store the samples `index` (one per row of `states`)."""
        stacked = torch.stack(states.layers, dim=1)  # (N, L + 1, T, width)
        device, dtype = self.device or stacked.device, self.dtype or stacked.dtype
        for row, key in enumerate(index):
            length = int(states.lengths[row])
            layers = stacked[row, :, :length].to(device, dtype, copy=True)
            pooled = states.pooled[row].to(device, copy=True)
            self._entries[key] = (layers, int(states.pool_index[row]), pooled)
            self.nbytes += layers.nbytes + pooled.nbytes
        self._check_size(len(index))

    def _check_size(self, added: int) -> None:
        if self.max_gb is None or len(self._entries) != added:  # projected once, from the first batch
            return
        projected_gb = self.nbytes / added * self.num_samples / 2**30
        if projected_gb > self.max_gb:
            raise ConfigError(
                f"The {self.name} hidden-state cache would need about {projected_gb:.1f} GB for {self.num_samples} "
                f"samples (limit method.module.max_cache_gb={self.max_gb}). Set method.module.cache=none to re-run "
                "the frozen backbone every step (still under no_grad), method.module.cache_dtype=float16 to halve "
                "it, or raise max_cache_gb if the memory is there."
            )

    def get(self, index: list[int], device: torch.device) -> TowerStates:
        """The cached states of `index`, padded to the batch's longest sample, on `device`."""
        entries = [self._entries[key] for key in index]
        lengths = torch.tensor([layers.shape[1] for layers, _, _ in entries])
        longest = int(lengths.max())
        if bool((lengths == longest).all()):
            stacked = torch.stack([layers for layers, _, _ in entries])
        else:
            first = entries[0][0]
            stacked = first.new_zeros((len(entries), first.shape[0], longest, first.shape[2]))
            for row, (layers, _, _) in enumerate(entries):
                stacked[row, :, : layers.shape[1]] = layers
        stacked = stacked.to(device, non_blocking=True)
        return TowerStates(
            list(stacked.unbind(dim=1)),
            lengths.to(device),
            torch.tensor([pool_index for _, pool_index, _ in entries], device=device),
            torch.stack([pooled for _, _, pooled in entries]).to(device),
        )
