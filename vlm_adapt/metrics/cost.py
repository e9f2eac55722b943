"""Cost of a run as a Lightning callback: trainable/total parameters, peak memory, time per step, wall time.

Peak memory is the CUDA allocator's peak on GPU and the process's peak resident set on CPU; the
`train_memory_mb` figure is that peak minus what was in use when training started (the loaded
model and data), i.e. what training itself added.

A resumed run continues the figures of the run it resumes (the monitor's state is saved in each
checkpoint): `train_steps` and the step times cover every segment's steps up to its checkpoint (each
segment's first steps are left out of the mean, as warm-up), `fit_time_s` is the sum of the segments'
fit times up to their checkpoints, peak memory the largest segment's, and `segments` says how many
processes the fit took (1 when it never resumed).
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
        """`skip_first_steps`: steps of each segment left out of the mean step time (allocator and kernel
        warm-up)."""
        self.skip_first_steps = skip_first_steps
        self.step_times: list[float] = []
        self.figures: dict[str, Any] = {}
        self._step_start = 0.0
        self._fit_start = 0.0
        self._baseline_mb = 0.0
        self._device: torch.device | None = None
        # a resumed run's earlier segments, from the checkpoint
        self._segment_starts: list[int] = [0]  # index in step_times of each segment's first step
        self._past: dict[str, float] = {"fit_time_s": 0.0, "peak_memory_mb": 0.0, "train_memory_mb": 0.0}

    def _on_cuda(self, pl_module: L.LightningModule) -> bool:
        return pl_module.device.type == "cuda"

    def _sync(self, pl_module: L.LightningModule) -> None:
        if self._on_cuda(pl_module):
            torch.cuda.synchronize(pl_module.device)

    def _count(self, pl_module: L.LightningModule) -> None:
        trainable, total = count_parameters(pl_module)
        self.figures.update(trainable_params=trainable, total_params=total)

    def _peak_mb(self, device: torch.device) -> float:
        return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()

    def _segments_so_far(self) -> dict[str, float]:
        """Fit time and peak memory over the segments up to now, this one included."""
        if self._device is None:  # not fitting
            return dict(self._past)
        peak = self._peak_mb(self._device)
        return {
            "fit_time_s": self._past["fit_time_s"] + time.perf_counter() - self._fit_start,
            "peak_memory_mb": max(self._past["peak_memory_mb"], peak),
            "train_memory_mb": max(self._past["train_memory_mb"], peak - self._baseline_mb, 0.0),
        }

    def state_dict(self) -> dict[str, Any]:
        """Saved in each checkpoint: the figures a resumed run continues from."""
        return {"step_times": list(self.step_times), "segment_starts": list(self._segment_starts),
                **self._segments_so_far()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step_times = list(state_dict["step_times"])
        self._segment_starts = [*state_dict["segment_starts"], len(self.step_times)]
        self._past = {key: float(state_dict[key]) for key in self._past}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._count(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._device = pl_module.device
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

    def _timed_steps(self) -> list[float]:
        """Step times without each segment's first `skip_first_steps` (all of them if that leaves none)."""
        ends = [*self._segment_starts[1:], len(self.step_times)]
        times = [t for start, end in zip(self._segment_starts, ends, strict=True)
                 for t in self.step_times[start + self.skip_first_steps : end]]
        return times or self.step_times

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._count(pl_module)
        times = self._timed_steps()
        totals = self._segments_so_far()
        self.figures.update(
            train_steps=len(self.step_times),
            time_per_step_s=statistics.mean(times) if times else None,
            median_time_per_step_s=statistics.median(times) if times else None,
            peak_memory_mb=round(totals["peak_memory_mb"], 1),
            train_memory_mb=round(totals["train_memory_mb"], 1),
            fit_time_s=round(totals["fit_time_s"], 3),
            segments=len(self._segment_starts),
            device=str(pl_module.device.type),
        )
        self._device = None

    def final_figures(self, pl_module: L.LightningModule) -> dict[str, Any]:
        """Figures at the end of the run (peak memory covers evaluation too when there was no fit)."""
        if "peak_memory_mb" not in self.figures:
            self.figures.update(peak_memory_mb=round(self._peak_mb(pl_module.device), 1), train_steps=0,
                                time_per_step_s=None, device=str(pl_module.device.type))
        return dict(self.figures)
