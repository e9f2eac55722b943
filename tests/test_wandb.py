"""Weights & Biases offline: a run's .wandb file holds its config and metrics; one run per multirun job."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import wandb
from conftest import FAST, REPO
from wandb.proto import wandb_internal_pb2

from vlm_adapt.train import train

BLOCK = 32 * 1024  # .wandb files are LevelDB-style logs: 32 KiB blocks of framed chunks
FULL, LAST = 1, 4


def read_wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of a .wandb file, decoded with wandb's own protobuf schema.

    wandb 0.31 has no Python reader for these files (its `datastore` module was removed and
    wandb-core reads them), so this undoes the framing: a 7-byte file header, then chunks with a
    7-byte header (checksum, length, type) that never cross a block boundary.
    """
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    records, payload, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block tail too short for a header: zero padding
            pos += BLOCK - pos % BLOCK
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def offline_runs(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def run_record(records: list[wandb_internal_pb2.Record]) -> wandb_internal_pb2.RunRecord:
    return next(r.run for r in records if r.WhichOneof("record_type") == "run")


def item_name(item: wandb_internal_pb2.HistoryItem | wandb_internal_pb2.ConfigItem) -> str:
    return item.key or "/".join(item.nested_key)  # names with "/" are stored split


def history(records: list[wandb_internal_pb2.Record]) -> dict[str, float]:
    """The last logged value of every metric."""
    values: dict[str, float] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            values.update({item_name(item): json.loads(item.value_json) for item in record.history.item})
    return values


def config_keys(records: list[wandb_internal_pb2.Record]) -> set[str]:
    return {item_name(item) for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update}


def test_offline_run_holds_config_metrics_and_cost(make_cfg, tmp_path):
    cfg = make_cfg("method=coop", "logger=wandb", "tags=[smoke]", "trainer.log_every_n_steps=1",
                   "trainer.limit_test_batches=2")
    train(cfg)
    wandb.teardown()  # wandb-core finishes writing the .wandb file after wandb.finish() returns
    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "metrics.json").read_text())
    [wandb_file] = offline_runs(run_dir)
    records = read_wandb_records(wandb_file)

    run = run_record(records)
    assert run.project == "vlm_adapt"
    assert list(run.tags) == ["smoke"]
    assert run.display_name == "coop-imagenette-few_shot-seed1"
    assert run.run_group.startswith("train-")
    assert {"method", "backbone", "data", "protocol", "trainer", "seed"} <= config_keys(records)

    logged = history(records)
    assert "train/loss" in logged and "val/acc" in logged  # per-epoch metrics from Lightning
    for name, value in record["metrics"].items():  # the final figures, as in metrics.json
        assert logged[f"final/{name}"] == value
    assert logged["cost/trainable_params"] == record["cost"]["trainable_params"] == 16 * 64
    assert logged["cost/wall_time_s"] == record["cost"]["wall_time_s"]
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)  # wandb.finish()


def test_two_job_multirun_makes_two_runs_in_one_group(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "VLM_ADAPT_LOG_DIR": str(tmp_path / "logs")}
    command = [sys.executable, "-m", "vlm_adapt", "train", "-m", *FAST, "method=zero_shot", "seed=1,2",
               "logger=wandb", "loader.eval_batch_size=20", "trainer.limit_test_batches=1", f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    runs = [run_record(read_wandb_records(f)) for job in ("0", "1") for f in offline_runs(sweep / job)]
    assert len(runs) == 2
    assert runs[0].run_id != runs[1].run_id
    assert [r.display_name for r in runs] == [f"zero_shot-imagenette-few_shot-seed{s}" for s in (1, 2)]
    assert {r.run_group for r in runs} == {"train-sweep"}  # named after the sweep directory


def test_wandb_goes_offline_without_a_key(monkeypatch, tmp_path):
    from vlm_adapt.config import wandb_offline

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_offline()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not wandb_offline()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline()
