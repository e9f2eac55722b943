"""A run killed with SIGKILL and rerun in its directory ends exactly as the same run uninterrupted.

Each test starts `vlm-adapt train` as a subprocess, pauses it at a known step through the test hook
`VLM_ADAPT_TEST_PAUSE_AT_STEP` (vlm_adapt/resume.py), kills it there with SIGKILL, reruns the same
command, and compares with the same command run without interruption: metrics.json, the trained
tensors of last.ckpt, and the CSV log (every row, timing and cost columns aside).

20 training images in batches of 4: 5 steps per epoch, a checkpoint after steps 5, 10, ...
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from vlm_adapt.resume import ResumableCSVLogger, capture_rng, restore_rng

RUN = ["backbone=tiny", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "loader.num_workers=0",
       "loader.eval_batch_size=250", "protocol.shots=2", "method.batch_size=4", "method.max_epochs=2",
       "trainer.log_every_n_steps=1"]  # a row per step: the rows logged between checkpoint and kill exist
SKIP_TUNING = ["method=skip_tuning", "method.module.start_layer=2", "method.module.drop_ratio=0.5"]
TIMEOUT_S = 300


class Run:
    """`vlm-adapt train RUN overrides hydra.run.dir=<dir>` in a subprocess, its output in <dir>.<n>.log."""

    def __init__(self, run_dir: Path, overrides: list[str], pause_at: int | None = None):
        self.dir, self.pause_at = run_dir, pause_at
        self.log = run_dir.with_suffix(f".{len(list(run_dir.parent.glob(run_dir.name + '.*.log')))}.log")
        env = {**os.environ, "VLM_ADAPT_CACHE_DIR": str(run_dir.with_suffix(".cache"))}
        env.pop("VLM_ADAPT_TEST_PAUSE_AT_STEP", None)
        if pause_at is not None:
            env["VLM_ADAPT_TEST_PAUSE_AT_STEP"] = str(pause_at)
        command = [sys.executable, "-m", "vlm_adapt", "train", *RUN, *overrides, f"hydra.run.dir={run_dir}"]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def kill_when_paused(self) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while f"VLM_ADAPT_PAUSED {self.pause_at}\n" not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"the run did not pause:\n{self.output()[-3000:]}")
            time.sleep(0.2)
        os.kill(self.process.pid, signal.SIGKILL)
        assert self.process.wait(timeout=30) == -signal.SIGKILL

    def finish(self) -> dict:
        try:
            returncode = self.process.wait(timeout=TIMEOUT_S)
        finally:
            self.process.kill()
        assert returncode == 0, self.output()[-3000:]
        return json.loads((self.dir / "metrics.json").read_text())


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv without the columns that measure time or cost (they differ between any two runs)."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    return [{k: v for k, v in row.items() if not k.startswith("cost/") and not k.endswith("_s")} for row in rows]


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def killed_and_resumed(tmp_path: Path, overrides: list[str], kills: list[int]) -> tuple[dict, dict, Path, Path]:
    """(metrics.json resumed, uninterrupted, their run dirs): the first run killed at each step of `kills`
    and rerun; the uninterrupted one runs alongside its first segment."""
    resumed_dir, plain_dir = tmp_path / "resumed", tmp_path / "uninterrupted"
    plain = Run(plain_dir, overrides)
    for step in kills:
        Run(resumed_dir, overrides, pause_at=step).kill_when_paused()
        assert (resumed_dir / "checkpoints" / "last.ckpt").is_file()
        assert json.loads((resumed_dir / "metrics.json").read_text())["status"] == "running"
        logged = {int(row["step"]) for row in csv_rows(resumed_dir)}
        assert step - 1 in logged  # logged up to the kill, rows past the checkpoint included: the resume drops them
    return Run(resumed_dir, overrides).finish(), plain.finish(), resumed_dir, plain_dir


def assert_same_run(resumed: dict, plain: dict, resumed_dir: Path, plain_dir: Path) -> None:
    assert resumed["status"] == plain["status"] == "completed"
    assert resumed["metrics"] == plain["metrics"]
    assert resumed["cost"]["train_steps"] == plain["cost"]["train_steps"]
    assert plain["resumes"] == [] and plain["cost"]["segments"] == 1
    trained, reference = checkpoint(resumed_dir)["state_dict"], checkpoint(plain_dir)["state_dict"]
    assert trained.keys() == reference.keys() and trained
    assert all(torch.equal(trained[name], reference[name]) for name in reference)
    assert csv_rows(resumed_dir) == csv_rows(plain_dir)


def draws() -> tuple[list[float], list[float], list[float]]:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_random_states_survive_a_weights_only_checkpoint(tmp_path):
    torch.save({"rng": capture_rng()}, tmp_path / "states.ckpt")
    expected = draws()
    restore_rng(torch.load(tmp_path / "states.ckpt", weights_only=True)["rng"])
    assert draws() == expected


@pytest.mark.parametrize("resume_at", [None, 2])
def test_csv_logger_keeps_the_rows_before_the_resumed_step(tmp_path, resume_at):
    """A resume keeps the earlier rows before its step; any other run starts the file afresh (as Lightning's)."""
    first = ResumableCSVLogger(tmp_path, name="csv", version="")
    for step in range(4):
        first.log_metrics({"loss": float(step)}, step=step)
    first.save()
    second = ResumableCSVLogger(tmp_path, name="csv", version="")
    if resume_at is not None:
        second.resume_at(resume_at)
    second.log_metrics({"loss": 9.0, "acc": 0.5}, step=2)
    second.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as file:
        rows = [(row["step"], row["loss"], row["acc"]) for row in csv.DictReader(file)]
    kept = [("0", "0.0", ""), ("1", "1.0", "")] if resume_at is not None else []
    assert rows == [*kept, ("2", "9.0", "0.5")]


def test_coop_killed_mid_epoch_resumes_exactly(tmp_path):
    """Killed at step 7 (epoch 1): it resumes from the checkpoint of step 5 and redoes steps 5 and 6."""
    resumed, plain, resumed_dir, plain_dir = killed_and_resumed(tmp_path, [], kills=[7])
    assert_same_run(resumed, plain, resumed_dir, plain_dir)
    assert resumed["resumes"] == [{"from_step": 5, "from_epoch": 1, "exact": True}]
    assert resumed["cost"]["segments"] == 2 and resumed["cost"]["train_steps"] == 10
    assert len(checkpoint(resumed_dir)["callbacks"]["CostMonitor"]["step_times"]) == 10


@pytest.mark.slow
def test_skip_tuning_killed_twice_resumes_exactly(tmp_path):
    """A per-epoch cache of augmented images, single-class batches (4 shots), token dropping and class
    skipping all draw random numbers. Killed at the first step after the checkpoint of step 10 (its
    epoch cache built), then in the middle of epoch 2."""
    overrides = [*SKIP_TUNING, "protocol.shots=4", "method.max_epochs=3"]  # 10 steps per epoch
    resumed, plain, resumed_dir, plain_dir = killed_and_resumed(tmp_path, overrides, kills=[10, 23])
    assert_same_run(resumed, plain, resumed_dir, plain_dir)
    assert resumed["resumes"] == [{"from_step": 10, "from_epoch": 1, "exact": True},
                                  {"from_step": 20, "from_epoch": 2, "exact": True}]
    assert resumed["cost"]["segments"] == 3


def test_resume_with_a_per_step_schedule_is_exact(tmp_path):
    """A per-step schedule asks Lightning for the step count, which builds the training loader before the
    checkpoint's epoch is restored: the loader is built again, so the resumed epoch shuffles as its own."""
    resumed, plain, resumed_dir, plain_dir = killed_and_resumed(
        tmp_path, ["+method.module.scheduler_interval=step"], kills=[7])
    assert_same_run(resumed, plain, resumed_dir, plain_dir)
    assert resumed["resumes"] == [{"from_step": 5, "from_epoch": 1, "exact": True}]


def test_resume_with_loader_workers_is_exact(tmp_path):
    """The training loader seeds its shuffle and its (non-persistent) workers from the seed and the epoch
    (vlm_adapt/data/loaders.py), so a run with loader workers resumes exactly too."""
    resumed, plain, resumed_dir, plain_dir = killed_and_resumed(tmp_path, ["loader.num_workers=2"], kills=[7])
    assert_same_run(resumed, plain, resumed_dir, plain_dir)
    assert resumed["resumes"] == [{"from_step": 5, "from_epoch": 1, "exact": True}]
