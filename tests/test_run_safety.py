"""Faults a user meets, run as the user runs them (the `vlm-adapt` command, real files, a real lock):
each asserts the exit status, the message, and what is on disk afterwards.

Runs that look valid and are not (divergence, another method's checkpoint, a random-init checkpoint
evaluated on another backbone), results that would be destroyed (a run directory written twice, a
live run's directory, a checkpoint cut short), and errors that must reach the user as one message.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST

from vlm_adapt.checkpoints import AtomicCheckpointIO

QUICK = [*FAST, "trainer.limit_test_batches=1"]


def vlm_adapt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_adapt", *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=600)


def train(run_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return vlm_adapt("train", *QUICK, *overrides, f"hydra.run.dir={run_dir}", env=env)


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one message a user error prints; no traceback around it."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("vlm-adapt")]
    assert len(starts) == 1, result.stderr[-3000:]
    return "\n".join(lines[starts[0]:])  # a message may list several problems, one per line


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in (".lock", "train.log")}


def test_a_completed_run_is_never_overwritten_without_overwrite_true(tmp_path):
    run = tmp_path / "run"
    assert train(run).returncode == 0
    before = snapshot(run)
    assert {"metrics.json", "checkpoints/last.ckpt", "csv/metrics.csv", ".hydra/config.yaml"} <= set(before)

    message = error_line(train(run, "method=clipfit"))
    assert "holds a completed run (method=coop on imagenette)" in message and "overwrite=true" in message
    assert snapshot(run) == before  # metrics, checkpoint, CSV and config untouched

    assert train(run, "method=clipfit", "overwrite=true").returncode == 0
    assert record(run)["method"] == "clipfit" and record(run)["status"] == "completed"
    assert "clipfit" in (run / ".hydra" / "config.yaml").read_text()


def test_divergence_stops_the_run_and_records_it(tmp_path):
    run = tmp_path / "run"
    result = train(run, "method=ft", "method.module.optimizer.lr=1e6", "++method.module.scheduler.warmup=0",
                   "method.max_epochs=2")
    message = error_line(result)
    assert "training diverged at optimizer step" in message and "learning rate" in message
    assert "method.module.optimizer.lr" in message
    saved = record(run)
    assert saved["status"] == "diverged" and saved["error"] in message
    assert "metrics" not in saved
    last = run / "checkpoints" / "last.ckpt"
    if last.exists():  # only a checkpoint from before the divergence may exist
        tensors = torch.load(last, weights_only=True)["state_dict"].values()
        assert all(torch.isfinite(t).all() for t in tensors)

    # the same directory with another config: refused, the diverged record and its config kept
    config = (run / ".hydra" / "config.yaml").read_text()
    message = error_line(train(run, "method=coop"))
    assert "holds an unfinished run (method=ft" in message and "status diverged" in message
    assert "differs in method.name: ft -> coop" in message
    assert record(run)["status"] == "diverged" and (run / ".hydra" / "config.yaml").read_text() == config


def test_a_directory_in_use_by_a_live_run_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live run holds it
        message = error_line(train(run))
    assert "is in use by a live run" in message and "hydra.run.dir" in message
    assert sorted(p.name for p in run.iterdir()) == [".lock", "train.log"]  # nothing of the refused run


def test_a_checkpoint_of_another_method_names_both(tmp_path):
    assert train(tmp_path / "zs", "method=zero_shot").returncode == 0
    message = error_line(train(tmp_path / "coop", f"ckpt_path={tmp_path / 'zs/checkpoints/last.ckpt'}"))
    assert "written by method=zero_shot" in message and "this run is method=coop" in message
    assert record(tmp_path / "coop")["status"] == "failed"


def test_evaluating_a_random_init_checkpoint_is_repeatable(tmp_path):
    assert train(tmp_path / "run", "seed=3").returncode == 0
    trained = record(tmp_path / "run")
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    assert torch.load(ckpt, weights_only=True)["vlm_adapt"]["backbone"]["init_seed"] == 3
    evals = []
    for name in ("e1", "e2"):
        result = vlm_adapt("eval", f"ckpt_path={ckpt}", *QUICK[:4], "trainer.limit_test_batches=1",
                           f"hydra.run.dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-3000:]
        evals.append(record(tmp_path / name)["metrics"]["test/imagenette/acc"])
    assert evals[0] == evals[1] == trained["metrics"]["test/imagenette/acc"]


def test_a_truncated_last_checkpoint_says_what_to_do(tmp_path):
    run = tmp_path / "run"
    assert train(run).returncode == 0
    last = run / "checkpoints" / "last.ckpt"
    state = record(run) | {"status": "running"}  # as if killed while saving
    (run / "metrics.json").write_text(json.dumps(state))
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    message = error_line(train(run))
    assert "checkpoints/last.ckpt" in message and "truncated" in message
    assert f"mv {last} {last}.corrupt" in message and "overwrite=true" in message
    assert record(run)["status"] == "failed"


def test_a_save_cut_short_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert (tmp_path / "last.ckpt.tmp").read_bytes() == b"partial"  # removed by the next resume


def test_user_errors_are_one_message_and_a_failed_record(tmp_path):
    run = tmp_path / "run"
    message = error_line(train(run, "trainer.precision=16-true"))
    assert message.startswith("vlm-adapt train: error: trainer.precision=16-true")
    saved = record(run)
    assert saved["status"] == "failed" and saved["error"] in message and saved["method"] == "coop"

    debug = train(tmp_path / "debug", "trainer.precision=16-true", env={"HYDRA_FULL_ERROR": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["seed=abc"], "seed='abc' is not an integer"),
        (["method.batch_size=0"], "method.batch_size"),
        (["data=image_folder"], "data=image_folder needs data.root="),
        (["protocol.shots=0"], "protocol.shots"),
    ],
)
def test_bad_values_name_the_key_to_change(tmp_path, overrides, expected):
    message = error_line(train(tmp_path / "run", *overrides))
    assert expected in message


def test_an_output_directory_that_cannot_be_created_is_one_message(tmp_path):
    (tmp_path / "a_file").write_text("")
    message = error_line(train(tmp_path / "a_file" / "run"))
    assert "cannot create the output directory" in message and "is a file" in message
    assert "hydra.run.dir=" in message


@pytest.mark.parametrize("precision", ["16-mixed", "16-true"])
def test_a_half_precision_overflow_is_caught_with_the_precision_fix(precision):
    # the loss check runs on every step whatever the precision; fp16's narrow range gets its own advice
    from types import SimpleNamespace

    from vlm_adapt.divergence import DivergenceGuard
    from vlm_adapt.errors import DivergedError

    optimizer = SimpleNamespace(param_groups=[{"lr": 0.002}])
    trainer = SimpleNamespace(global_step=7, current_epoch=1, precision=precision, optimizers=[optimizer])
    guard = DivergenceGuard()
    guard.on_train_batch_end(trainer, torch.nn.Linear(2, 2), {"loss": torch.tensor(1.5)}, None, 3)  # finite: fine
    with pytest.raises(DivergedError, match=rf"optimizer step 7, epoch 1, batch 3: the training loss is inf .*"
                                            rf"{precision}.*trainer.precision=bf16-mixed or 32-true"):
        guard.on_train_batch_end(trainer, torch.nn.Linear(2, 2), {"loss": torch.tensor(float("inf"))}, None, 3)
