"""Cost of a run as a Lightning callback: trainable/total parameters, peak memory, time per step, wall time.

Peak memory is the CUDA allocator's peak on GPU and the process's peak resident set on CPU; the
`train_memory_mb` figure is that peak minus what was in use when training started (the loaded
model and data), i.e. what training itself added.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any

import lightning as L
import torch

from vlm_adapt.backbones.loading import count_parameters


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class CostMonitor(L.Callback):
    """Collects the cost figures that every run writes into metrics.json."""

    def __init__(self, skip_first_steps: int = 1):
        """`skip_first_steps`: steps left out of the mean step time (allocator and kernel warm-up)."""
        self.skip_first_steps = skip_first_steps
        self.step_times: list[float] = []
        self.figures: dict[str, Any] = {}
        self._step_start = 0.0
        self._fit_start = 0.0
        self._baseline_mb = 0.0

    def _on_cuda(self, pl_module: L.LightningModule) -> bool:
        return pl_module.device.type == "cuda"

    def _sync(self, pl_module: L.LightningModule) -> None:
        if self._on_cuda(pl_module):
            torch.cuda.synchronize(pl_module.device)

    def _count(self, pl_module: L.LightningModule) -> None:
        trainable, total = count_parameters(pl_module)
        self.figures.update(trainable_params=trainable, total_params=total)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._count(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        if self._on_cuda(pl_module):
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            self._baseline_mb = torch.cuda.memory_allocated(pl_module.device) / 2**20
        else:
            self._baseline_mb = current_rss_mb()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.step_times.append(time.perf_counter() - self._step_start)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._count(pl_module)
        times = self.step_times[self.skip_first_steps :] or self.step_times
        if self._on_cuda(pl_module):
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        else:
            peak = peak_rss_mb()
        self.figures.update(
            train_steps=len(self.step_times),
            time_per_step_s=statistics.mean(times) if times else None,
            median_time_per_step_s=statistics.median(times) if times else None,
            peak_memory_mb=round(peak, 1),
            train_memory_mb=round(max(0.0, peak - self._baseline_mb), 1),
            fit_time_s=round(time.perf_counter() - self._fit_start, 3),
            device=str(pl_module.device.type),
        )

    def final_figures(self, pl_module: L.LightningModule) -> dict[str, Any]:
        """Figures at the end of the run (peak memory covers evaluation too when there was no fit)."""
        if "peak_memory_mb" not in self.figures:
            on_cuda = self._on_cuda(pl_module)
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20 if on_cuda else peak_rss_mb()
            self.figures.update(peak_memory_mb=round(peak, 1), train_steps=0, time_per_step_s=None,
                                device=str(pl_module.device.type))
        return dict(self.figures)
