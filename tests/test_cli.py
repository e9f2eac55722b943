"""The command line as a user runs it: sweeps, clear errors, and an installed (non-editable) package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import FAST, REPO


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlm_adapt", *args], cwd=cwd, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=600,
    )


def test_two_job_multirun_writes_two_metrics_files(tmp_path):
    result = run_cli("train", "-m", "method=zero_shot,coop", *FAST, "trainer.limit_test_batches=1",
                     f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / str(job) / "metrics.json").read_text()) for job in (0, 1)]
    assert [r["method"] for r in records] == ["zero_shot", "coop"]
    assert all(r["status"] == "completed" and r["random_init"] for r in records)
    assert (tmp_path / "1" / ".hydra" / "config.yaml").is_file()


def test_unknown_method_lists_the_available_ones(tmp_path):
    result = run_cli("train", "method=nope", *FAST[1:], f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "Could not find 'method/nope'" in result.stderr
    assert "Available options in 'method'" in result.stderr and "coop" in result.stderr


def test_missing_dataset_root_says_how_to_fix_it(tmp_path):
    result = run_cli("train", *FAST, "data=oxford_pets", f"data.root={tmp_path}/pets", f"hydra.run.dir={tmp_path}/r")
    assert result.returncode != 0
    assert "vlm-adapt train: error: Dataset 'oxford_pets'" in result.stderr and "Set data.root=" in result.stderr
    assert "Traceback" not in result.stderr


def test_unavailable_weights_say_how_to_fix_it(tmp_path):
    result = run_cli("train", *FAST[1:], "backbone=vit_b16", "backbone.pretrained=/no/such/weights.pt",
                     f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "vlm-adapt train: error: backbone.pretrained=" in result.stderr and "local-dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0 and all(c in result.stdout for c in ("train", "eval", "bench", "report"))


def test_installed_wheel_finds_its_configs_from_any_directory(tmp_path):
    """A non-editable install carries conf/ inside the package as vlm_adapt.conf."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir),
         str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheel_dir.glob("vlm_adapt-*.whl"))
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli("train", "method=clipfit" if (REPO / "conf/method/clipfit.yaml").exists() else "method=coop",
                     "data=eurosat", "--cfg", "job", cwd=elsewhere, env={"PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "split_zhou_EuroSAT.json" in result.stdout
    where = subprocess.run([sys.executable, "-c", "import vlm_adapt.conf, sys; print(vlm_adapt.conf.__file__)"],
                           cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert where.stdout.startswith(str(target))


def test_console_script_runs_the_same_app():
    script = Path(sys.executable).parent / "vlm-adapt"
    result = subprocess.run([str(script), "eval", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Powered by Hydra" in result.stdout and "ckpt_path" in result.stdout
