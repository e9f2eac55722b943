"""Two CPU processes (DDP, gloo) under Hydra: one run directory, one logger run, global accuracies.

The sweep runs each method single-process and with trainer=ddp_cpu on a 7-image test set: an odd
count, where padding a rank's share with a repeated image would change the accuracy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from conftest import FAST, REPO, SHARED_DATA
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from vlm_adapt import distributed
from vlm_adapt.errors import ConfigError

CLASSES = ["n01440764", "n02102040", "n02979186"]  # tench, English springer, cassette player
TEST_IMAGES = {"n01440764": 3, "n02102040": 2, "n02979186": 2}  # 7


@pytest.fixture
def odd_dataset(tmp_path: Path) -> Path:
    """An image folder of shipped Imagenette images (links): 2 train, 2 val and 2-3 test images per class."""
    root = tmp_path / "odd"
    lines = (SHARED_DATA / "imagenette" / "classnames.txt").read_text().splitlines()
    names = dict(line.split(" ", 1) for line in lines)
    (root / "images").mkdir(parents=True)
    (root / "classnames.txt").write_text("".join(f"{wnid} {names[wnid]}\n" for wnid in CLASSES))
    for wnid in CLASSES:
        files = sorted((SHARED_DATA / "imagenette" / "images" / wnid).glob("*.jpg"))
        splits = {"train": files[:2], "val": files[2:4], "test": files[4 : 4 + TEST_IMAGES[wnid]]}
        for split, chosen in splits.items():
            folder = root / "images" / split / wnid
            folder.mkdir(parents=True)
            for file in chosen:
                (folder / file.name).symlink_to(file)
    return root


def run_sweep(tmp_path: Path, *overrides: str) -> Path:
    """`vlm-adapt train -m ...` through the console script, as a user runs it; returns the sweep dir."""
    sweep = tmp_path / "logs" / "sweep"
    env = {**os.environ, "VLM_ADAPT_LOG_DIR": str(tmp_path / "logs")}
    command = [str(Path(sys.executable).parent / "vlm-adapt"), "train", "-m", *FAST, *overrides,
               f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return sweep


def jobs_by_overrides(sweep: Path) -> dict[tuple[str, str], Path]:
    """(method, trainer) -> job directory."""
    jobs = {}
    for job in sorted(p for p in sweep.iterdir() if p.name.isdigit()):
        chosen = dict(o.split("=", 1) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        jobs[chosen["method"], chosen["trainer"]] = job
    return jobs


@pytest.mark.slow
def test_ddp_cpu_matches_single_process_in_one_run_directory(tmp_path, odd_dataset):
    sweep = run_sweep(
        tmp_path, "method=zero_shot,coop", "trainer=cpu,ddp_cpu", "logger=wandb",
        "data=image_folder", f"data.root={odd_dataset}", "data.split_dirs={train:train,val:val,test:test}",
        "method.batch_size=2", "method.max_epochs=2",
    )
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["sweep"]  # no run directory of rank 1's own
    jobs = jobs_by_overrides(sweep)
    assert len(jobs) == 4
    records = {key: json.loads((job / "metrics.json").read_text()) for key, job in jobs.items()}
    assert all(r["status"] == "completed" for r in records.values())

    for method in ("zero_shot", "coop"):
        single, ddp = records[method, "cpu"], records[method, "ddp_cpu"]
        assert ddp.keys() == single.keys()
        assert ddp["metrics"].keys() == single["metrics"].keys()
        assert ddp["cost"].keys() == single["cost"].keys()
        ddp_dir = jobs[method, "ddp_cpu"]
        assert (ddp_dir / "train_ddp_process_1.log").is_file()  # rank 1 ran this job, in this directory
        assert len(list((ddp_dir / "wandb").glob("offline-run-*"))) == 1  # one logger run, rank 0's

    # zero-shot: same weights, so the same predictions; the accuracy is over all 7 images, each once
    accuracy = records["zero_shot", "ddp_cpu"]["metrics"]["test/image_folder/acc"]
    assert accuracy == records["zero_shot", "cpu"]["metrics"]["test/image_folder/acc"]
    correct = round(accuracy * 7 / 100)
    assert accuracy == pytest.approx(100 * correct / 7, abs=1e-3)  # k of 7, not of 8 with a repeated image
    # CoOp: 6 training images in batches of 2 are 3 steps an epoch; each of 2 ranks takes 3 images, one full
    # batch (CoOp's recipe drops the last partial batch, as Dassl does)
    assert records["coop", "cpu"]["cost"]["train_steps"] == 2 * 3
    assert records["coop", "ddp_cpu"]["cost"]["train_steps"] == 2 * 1
    assert "val/acc" in records["coop", "ddp_cpu"]["metrics"]


@pytest.fixture
def ddp_trainer():
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    yield trainer
    distributed.end_previous_launch()


def test_ddp_relaunch_reruns_only_this_job_in_its_directory(make_cfg, tmp_path, monkeypatch, ddp_trainer):
    make_cfg("method=zero_shot")  # sets HydraConfig as a Hydra job would
    monkeypatch.setattr(sys, "argv", ["vlm-adapt-train", "-m", "method=zero_shot,coop"])  # as cli.py leaves it
    distributed.point_ddp_relaunch_at_job(ddp_trainer, tmp_path / "job")
    script, command, *overrides = sys.argv
    assert Path(script).is_absolute() and command == "train"
    assert overrides == list(HydraConfig.get().overrides.task)  # this job's overrides, no sweep
    assert "method=zero_shot" in overrides and "-m" not in overrides
    assert HydraConfig.get().run.dir == str(tmp_path / "job")  # Lightning appends hydra.run.dir=<this>
    distributed.end_previous_launch()
    assert sys.argv == ["vlm-adapt-train", "-m", "method=zero_shot,coop"]


def test_ddp_relaunch_outside_the_cli_is_refused(make_cfg, ddp_trainer, tmp_path):
    make_cfg("method=zero_shot")
    with pytest.raises(ConfigError, match="vlm-adapt train"):
        distributed.point_ddp_relaunch_at_job(ddp_trainer, tmp_path)
