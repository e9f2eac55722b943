"""Sweeps as Slurm jobs through hydra-submitit-launcher, on the local cluster of scripts/slurm/start.sh.

The launcher configs are checked without a cluster. The jobs need `sinfo` to answer with a usable
node (CI runs `bash scripts/slurm/start.sh` first) and are skipped, saying so, otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FAST, REPO
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from vlm_adapt.train import train

# small jobs for a 2-CPU node; timeout_min above 10, so that a signal in the first minutes is a preemption
SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4",
         "hydra.launcher.timeout_min=30", "loader.eval_batch_size=50"]


def launcher_config(*overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="vlm_adapt.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True).hydra.launcher


def test_launchers_ask_one_task_per_device():
    ddp = launcher_config("hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2")
    assert (ddp.tasks_per_node, ddp.gpus_per_node, ddp.nodes) == (2, 2, 2)
    cpu = launcher_config("hydra/launcher=slurm", "trainer=ddp_cpu")
    assert (cpu.tasks_per_node, cpu.gpus_per_node) == (2, 0)
    assert cpu.additional_parameters.requeue is True and cpu.max_num_timeout > 0
    local = launcher_config("hydra/launcher=submitit_local", "trainer=gpu")
    assert (local.tasks_per_node, local.gpus_per_node) == (1, 1)


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    fix = "start the local cluster with `sudo bash scripts/slurm/start.sh`"
    if shutil.which("sinfo") is None:
        pytest.skip(f"Slurm is not installed (no sinfo): {fix}")
    try:
        done = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.skip(f"sinfo does not answer (slurmctld down?): {fix}")
    if done.returncode != 0 or not {"idle", "mix", "alloc"} & set(done.stdout.split()):
        pytest.skip(f"no usable Slurm node (sinfo: {(done.stdout + done.stderr).strip()!r}): {fix}")


class Sweep:
    """`vlm-adapt train -m hydra/launcher=slurm ...` started with the venv's Python, and its sweep dir."""

    def __init__(self, tmp_path: Path, *overrides: str):
        self.dir = tmp_path / "sweep"
        self.log = tmp_path / "launcher.log"
        env = {**os.environ, "VLM_ADAPT_LOG_DIR": str(tmp_path / "logs")}
        command = [sys.executable, "-m", "vlm_adapt", "train", "-m", *FAST, *SLURM, *overrides,
                   f"hydra.sweep.dir={self.dir}"]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def job_logs(self, tail: int | None = None) -> str:
        logs = sorted((self.dir / ".submitit").glob("*/*_log.*"))
        return "\n".join(f"--- {path}\n{path.read_text()[-(tail or 0):]}" for path in logs)

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline or self.process.poll() not in (None, 0):
                self.stop()
                raise AssertionError(f"no {what} after {timeout_s:.0f}s\n{self.log.read_text()[-3000:]}\n"
                                     f"{self.job_logs(tail=2500)}")
            time.sleep(1)

    def finish(self, timeout_s: float = 120) -> None:
        self.wait_for(lambda: self.process.poll() is not None, timeout_s, "launcher exit")
        assert self.process.returncode == 0, self.log.read_text()[-3000:] + self.job_logs(tail=2500)

    def job_ids(self) -> list[str]:
        """Slurm ids of the submitted jobs (`<id>` or, for a job array, `<id>_<index>`)."""
        return sorted(p.parent.name for p in (self.dir / ".submitit").glob("*/*_submitted.pkl"))

    def stop(self) -> None:
        self.process.kill()
        for job_id in self.job_ids():
            subprocess.run(["scancel", job_id], check=False)


@pytest.fixture
def start_sweep(tmp_path: Path, slurm_cluster: None):
    """start_sweep(*overrides) -> Sweep; whatever a failing test leaves running is stopped afterwards."""
    sweeps: list[Sweep] = []

    def start(*overrides: str) -> Sweep:
        sweeps.append(Sweep(tmp_path, *overrides))
        return sweeps[-1]

    yield start
    for sweep in sweeps:
        if sweep.process.poll() is None:
            sweep.stop()


def completed(job: Path) -> bool:
    path = job / "metrics.json"
    return path.is_file() and json.loads(path.read_text())["status"] == "completed"


def job_state(job_id: str) -> str:
    return subprocess.run(["squeue", "--noheader", "--format=%T", f"--jobs={job_id}"],
                          capture_output=True, text=True).stdout.strip()


@pytest.mark.slow
@pytest.mark.slurm
def test_two_job_sweep_runs_as_slurm_jobs(start_sweep):
    sweep = start_sweep("method=zero_shot,coop")
    sweep.wait_for(lambda: completed(sweep.dir / "0") and completed(sweep.dir / "1"), 300, "metrics.json of both jobs")
    sweep.finish()
    [script] = (sweep.dir / ".submitit").glob("*/*_submission.sh")
    assert "#SBATCH --ntasks-per-node=1" in script.read_text() and "#SBATCH --requeue" in script.read_text()
    assert sweep.job_logs().count("Starting with JobEnvironment(job_id=") == 2  # each job ran as a Slurm task
    methods = {json.loads((sweep.dir / job / "metrics.json").read_text())["method"] for job in ("0", "1")}
    assert methods == {"zero_shot", "coop"}


@pytest.mark.slow
@pytest.mark.slurm
def test_preempted_job_is_requeued_and_resumes_in_its_directory(start_sweep):
    epochs, steps_per_epoch = 18, 2  # 20 images in batches of 8, the partial one dropped
    sweep = start_sweep("method=coop", f"method.max_epochs={epochs}")
    job = sweep.dir / "0"
    sweep.wait_for(lambda: (job / "checkpoints" / "last.ckpt").is_file(), 180, "first checkpoint")
    [job_id] = sweep.job_ids()
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what Slurm sends a preempted job
    def requeued() -> bool:  # pending again, or already restarted
        return job_state(job_id) == "PENDING" or sweep.job_logs().count("Starting with JobEnvironment") == 2

    sweep.wait_for(requeued, 60, "requeued job")
    # Slurm holds a requeued job for a while before it is eligible again; skip that wait
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
    sweep.wait_for(lambda: completed(job), 300, "metrics.json of the requeued job")
    sweep.finish()

    assert "Requeued job" in sweep.job_logs()
    assert f"Resuming from {job / 'checkpoints' / 'last.ckpt'}" in (job / "train.log").read_text()
    assert sorted(p.name for p in sweep.dir.iterdir() if not p.name.startswith(".")) == ["0", "multirun.yaml"]
    record = json.loads((job / "metrics.json").read_text())
    [resume] = record["resumes"]  # continued from its checkpoint, did not start over
    assert resume["from_step"] > 0 and resume["exact"] and record["cost"]["segments"] == 2
    assert record["cost"]["train_steps"] == epochs * steps_per_epoch  # counted over both segments


@pytest.mark.slow
@pytest.mark.slurm
def test_ddp_job_runs_one_slurm_task_per_rank(start_sweep, make_cfg, tmp_path):
    sweep = start_sweep("method=zero_shot", "trainer=ddp_cpu")
    sweep.wait_for(lambda: completed(sweep.dir / "0"), 300, "metrics.json of the DDP job")
    sweep.finish()
    [script] = (sweep.dir / ".submitit").glob("*/*_submission.sh")
    assert "#SBATCH --ntasks-per-node=2" in script.read_text()
    assert "Starting with 2 processes" in sweep.job_logs()
    ddp = json.loads((sweep.dir / "0" / "metrics.json").read_text())["metrics"]["test/imagenette/acc"]

    train(make_cfg("method=zero_shot", "loader.eval_batch_size=50", output="single"))
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())["metrics"]["test/imagenette/acc"]
    assert ddp == single


@pytest.mark.slow
@pytest.mark.slurm
def test_comparison_table_script_runs_its_recipes_as_slurm_jobs_and_reports(tmp_path, slurm_cluster):
    """experiments/comparison_table.sh narrowed to two recipes on one dataset and seed: two Slurm jobs, one report."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "SWEEP_DIR": str(sweep), "VLM_ADAPT": f"{sys.executable} -m vlm_adapt",
           "VLM_ADAPT_LOG_DIR": str(tmp_path / "logs"), "TRAINER": "cpu"}
    recipes = "+experiment@_global_=zero_shot_base2new,coop_base2new"
    done = subprocess.run(["bash", str(REPO / "experiments" / "comparison_table.sh"), *FAST, *SLURM, recipes,
                           "data=imagenette", "seed=1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert sorted((r["method"], r["task_name"], r["status"]) for r in records) == [
        ("coop", "coop_base2new", "completed"), ("zero_shot", "zero_shot_base2new", "completed")]
    assert len(list((sweep / ".submitit").glob("*/*_submitted.pkl"))) == 2
    report = (sweep / "report" / "comparison.csv").read_text().splitlines()
    assert report[0].startswith("Method,Backbone,Shots,Datasets,Base mean") and "imagenette mean" in report[0]
    assert sorted(line.split(",")[0] for line in report[1:]) == ["coop", "zero_shot"]
