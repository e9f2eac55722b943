"""Exact resume from an epoch-end checkpoint: random states, logger history, and a record of each resume.

A run killed after an epoch's `checkpoints/last.ckpt` and rerun in the same directory continues as if
it had never stopped (on CPU: same metrics, same trained tensors, same CSV rows):

- The training loader (`vlm_adapt/data/loaders.py`) seeds its shuffle and its workers from the run's
  seed and the epoch, so the batches and the workers' augmentations of an epoch do not depend on what
  came before it.
- `ResumeState.state_dict` (saved in the checkpoint, at the end of an epoch) holds the global random
  states of torch (CPU and CUDA), numpy and Python's `random` (augmentation in the main process, a
  method's own draws). They are restored at the start of the first epoch of the resumed run
  (`on_train_epoch_start`, before the method's own epoch-start hook, which builds Skip Tuning's
  augmented cache), i.e. where the uninterrupted run drew from the same states: nothing draws between
  the save and the next epoch's start. The sanity-check validation does not matter: Lightning runs it
  inside `isolate_rng`.
- A training loader of another kind (image-text retrieval) draws its iterator's seed from a generator
  of its own (set in `on_train_start`): Lightning creates that iterator before `on_train_epoch_start`
  in the first epoch of a fit but after it in later epochs, which would shift the global stream.
- `ResumableCSVLogger` keeps `<run>/csv/metrics.csv` across a resume (Lightning's CSVLogger deletes
  it), without the rows logged after the checkpoint: the resumed run logs those steps again.
- `resumes` lists where each resume started (`from_step`: optimizer steps, `from_epoch`: completed
  epochs); train.py writes it into metrics.json. `CostMonitor` keeps its own figures across segments.

A run killed in the middle of an epoch resumes from the previous epoch's end (the last checkpoint) and
redoes that epoch, which is still exact. Not exact: workers of loaders other than the training
loader above, multi-process runs (only rank 0's states are saved) and mid-epoch checkpoints; the
resume entry says `"exact": false` for those, and the run warns.

Test hook: `VLM_ADAPT_TEST_PAUSE_AT_STEP=<n>` makes the run print `VLM_ADAPT_PAUSED <n>` and sleep at
the start of global step n, so a test can kill it at a known point.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from vlm_adapt.data.loaders import EpochSeededLoader

log = logging.getLogger(__name__)

PAUSE_ENV = "VLM_ADAPT_TEST_PAUSE_AT_STEP"


def capture_rng() -> dict[str, Any]:
    """The global random states, as tensors and plain values (checkpoints are read with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global random states captured by `capture_rng`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class ResumeState(L.Callback):
    """Saves the random states with each checkpoint and restores them where the resumed run needs them."""

    def __init__(self) -> None:
        self.resumes: list[dict[str, Any]] = []  # one entry per resume of this run, oldest first
        self._trainer: L.Trainer | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._logger_step = 0
        self._loader_generator = torch.Generator()  # see on_train_start; only worker base seeds come from it

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer  # state_dict reads where the checkpoint is taken

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        assert trainer is not None, "ResumeState.state_dict before setup"
        return {
            "rng": capture_rng(),
            "resumes": list(self.resumes),
            "step": trainer.global_step,
            "epoch": trainer.fit_loop.epoch_progress.current.processed,  # epochs completed
            "logger_step": trainer.fit_loop.epoch_loop._batches_that_stepped,  # the `step` loggers write next
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_rng = state_dict["rng"]
        self._logger_step = state_dict["logger_step"]
        entry = {"from_step": state_dict["step"], "from_epoch": state_dict["epoch"], "exact": True}
        self.resumes = [*state_dict["resumes"], entry]

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}):  # written without ResumeState: say so
            self.resumes = [{"from_step": checkpoint.get("global_step"), "from_epoch": None, "exact": False}]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending_rng is not None:  # resuming: before anything is logged
            for logger in trainer.loggers:
                if isinstance(logger, ResumableCSVLogger):
                    logger.resume_at(self._logger_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending_rng is not None:
            mid_epoch = trainer.fit_loop.restarted_mid_epoch  # the states are those of an epoch's end
            exact = trainer.world_size == 1 and not any(loader_workers(trainer)) and not mid_epoch
            self.resumes[-1]["exact"] = exact
            if not exact:
                log.warning("This resume is not exact: loader workers, other processes or a mid-epoch checkpoint "
                            "hold random states the checkpoint does not restore (a checkpoint from an epoch's end, "
                            "loader.num_workers=0 and one device resume exactly).")

        def own_generator(loader: DataLoader) -> None:
            if loader.generator is None:  # only the iterator's seed draw; the sampler keeps the global one
                loader.generator = self._loader_generator

        apply_to_collection(trainer.train_dataloader, DataLoader, own_generator)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending_rng is not None:
            restore_rng(self._pending_rng)
            self._pending_rng = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if os.environ.get(PAUSE_ENV) == str(trainer.global_step):  # test hook, see the module docstring
            print(f"VLM_ADAPT_PAUSED {trainer.global_step}", flush=True)
            time.sleep(3600)


def loader_workers(trainer: L.Trainer) -> list[int]:
    """`num_workers` of each training loader whose workers' random states a checkpoint cannot restore
    (an `EpochSeededLoader` seeds them from the epoch, so its workers do not count)."""
    counts: list[int] = []
    apply_to_collection(trainer.train_dataloader, DataLoader, lambda loader: counts.append(
        0 if isinstance(loader, EpochSeededLoader) else loader.num_workers))
    return counts


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run keeps the rows logged before its checkpoint."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumableWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def resume_at(self, step: int) -> None:
        """Keep the existing rows logged before `step` (ResumeState calls this when a fit resumes)."""
        self.experiment.keep_before = step


class ResumableWriter(ExperimentWriter):
    """Leaves an existing metrics.csv alone until the first save: a resume then keeps its rows before
    `keep_before`, any other run starts it afresh (as Lightning's writer does on creation)."""

    def __init__(self, log_dir: str) -> None:
        self.keep_before: int | None = None
        self._started = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes metrics.csv here; `save` decides instead, once a resume is known."""

    def save(self) -> None:
        if self.metrics and not self._started:
            self._started = True
            self._start_file()
        super().save()

    def _start_file(self) -> None:
        path = self.metrics_file_path
        if not self._fs.isfile(path):
            return
        if self.keep_before is None:
            log.warning("Replacing %s, the metrics of an earlier run in this directory", path)
            self._fs.rm_file(path)
            return
        with self._fs.open(path, "r", newline="") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if float(row["step"]) < self.keep_before]
        with self._fs.open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(header)
