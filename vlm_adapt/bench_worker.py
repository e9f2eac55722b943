"""What runs inside each process of `vlm-adapt bench`: one method's real training run, timed.

`run_job` loads a fully resolved training config written by `vlm_adapt.bench` and calls the same
`vlm_adapt.train.train` as `vlm-adapt train`, so the bench measures what users run. That run's
`CostMonitor` writes trainable parameters and peak memory to `metrics.json`; `EpochTimer` (a
callback in the config) writes each epoch's step times and the time spent outside the steps to
`timing.json`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from vlm_adapt.train import train

TIMING_FILE = "timing.json"


class EpochTimer(L.Callback):
    """Per epoch: the time of each training step and the time spent outside the steps.

    - `startup_s`: from `setup` to the first epoch (one-off work: moving to the device, prompt caches,
      CLIPFit's zero-shot features, optimizer creation);
    - per epoch, `start_s`: from the start of the epoch to its first step (caches a method builds in
      `on_train_epoch_start`, such as Skip Tuning's LSkip features, and the first batch load);
      `step_s`: each step, as `CostMonitor` times it (`step_cpu_s`: the process's CPU time in it,
      which other processes on a busy machine disturb less than the wall time); `end_s`: from the
      last step to the start of the next epoch or the end of training (e.g. the linear probe's fit);
      `wall_s`: the whole epoch.

    A cache filled lazily during the first epoch (UniPT's hidden states) shows as a first epoch that
    takes longer than the next, which is why the bench runs two.
    """

    def __init__(self, output_file: str):
        self.output_file = Path(output_file)
        self.figures: dict[str, Any] = {"startup_s": None, "epochs": []}
        self._setup_at = 0.0
        self._epoch: dict[str, Any] | None = None
        self._epoch_started_at = 0.0
        self._step_started_at = 0.0
        self._step_cpu_started_at = 0.0
        self._ended_at: float | None = None

    def _now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def _close_epoch(self, now: float) -> None:
        if self._epoch is not None and self._ended_at is not None:
            self._epoch["end_s"] = now - self._ended_at
            self._epoch["wall_s"] = now - self._epoch_started_at
            self.figures["epochs"].append(self._epoch)
        self._epoch, self._ended_at = None, None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._setup_at = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # callbacks run before the module's own hook, so the module's epoch-start work falls inside
        now = self._now(pl_module)
        self._close_epoch(now)
        if self.figures["startup_s"] is None:
            self.figures["startup_s"] = now - self._setup_at
        self._epoch = {"start_s": None, "step_s": [], "step_cpu_s": []}
        self._epoch_started_at = now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = self._now(pl_module)
        if self._epoch["start_s"] is None:
            self._epoch["start_s"] = now - self._epoch_started_at
        self._step_started_at = now
        self._step_cpu_started_at = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._epoch["step_s"].append(self._now(pl_module) - self._step_started_at)
        self._epoch["step_cpu_s"].append(time.process_time() - self._step_cpu_started_at)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs before the module's on_train_epoch_end (Lightning calls non-monitoring callbacks first)
        self._ended_at = self._now(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_epoch(self._now(pl_module))
        loader = trainer.train_dataloader
        self.figures["batches_per_epoch"] = len(loader) if hasattr(loader, "__len__") else None
        self.output_file.parent.mkdir(parents=True, exist_ok=True)
        self.output_file.write_text(json.dumps(self.figures, indent=2) + "\n")


def run_job(config_file: str, log_file: str, num_threads: int | None = None) -> None:
    """Train with the config in `config_file`; stdout and stderr go to `log_file`."""
    with open(log_file, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        train(OmegaConf.load(config_file))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
