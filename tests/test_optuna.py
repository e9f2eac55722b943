"""Optuna sweeps: trials return metrics.json's val/acc, and a study resumes in its SQLite file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
from conftest import FAST, REPO
from omegaconf import OmegaConf

from vlm_adapt.optuna_storage import sqlite_storage

# two quick trials: one shot per class, a single test batch of 20 images
TRIALS = ["hydra.sweeper.n_trials=2", "protocol.shots=1", "loader.eval_batch_size=20", "trainer.limit_test_batches=1",
          "callbacks=none", "logger=none"]


def run_study(tmp_path: Path, sweep: str) -> Path:
    env = {**os.environ, "VLM_ADAPT_LOG_DIR": str(tmp_path / "logs")}
    sweep_dir = tmp_path / sweep
    command = [sys.executable, "-m", "vlm_adapt", "train", "-m", "hparams_search=coop_optuna", *FAST, *TRIALS,
               f"hydra.sweep.dir={sweep_dir}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return sweep_dir


def val_acc(job_dir: Path) -> float:
    return json.loads((job_dir / "metrics.json").read_text())["metrics"]["val/acc"]


def test_coop_study_optimizes_val_acc_and_resumes(tmp_path):
    database = tmp_path / "logs" / "optuna" / "coop_optuna.db"

    first = run_study(tmp_path, "sweep1")
    study = optuna.load_study(study_name="coop_optuna", storage=sqlite_storage(str(database)))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert [t.value for t in study.trials] == [val_acc(first / str(i)) for i in range(2)]
    assert set(study.trials[0].params) == {"method.module.optimizer.lr", "method.module.n_ctx"}
    best = OmegaConf.load(first / "optimization_results.yaml")
    assert best.best_value == max(t.value for t in study.trials)

    second = run_study(tmp_path, "sweep2")  # same command again: the study grows
    study = optuna.load_study(study_name="coop_optuna", storage=sqlite_storage(str(database)))
    assert len(study.trials) == 4
    assert [t.value for t in study.trials[2:]] == [val_acc(second / str(i)) for i in range(2)]
    learning_rates = [t.params["method.module.optimizer.lr"] for t in study.trials]
    assert len(set(learning_rates)) == 4  # new trials, not a replay of the first two
