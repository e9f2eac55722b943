"""`vlm-adapt report` on real sweeps: tables match the runs' metrics.json, plots are images, bad runs are listed.

The base-to-new sweep runs once per module with the real CLI (`python -m vlm_adapt train -m ...`) on
the tiny backbone, zero-shot and CoOp over two seeds; the slow tests add a few-shot sweep and the
experiments/ script.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import FAST, REPO
from PIL import Image

from vlm_adapt.cli import main as vlm_adapt_main
from vlm_adapt.report.runs import Run
from vlm_adapt.report.stats import harmonic_mean
from vlm_adapt.report.tables import comparison_table

SWEEP_FAST = [*FAST, "trainer.limit_test_batches=1", "callbacks=none", "logger=none"]
PLOTS = ("accuracy_vs_shots", "accuracy_vs_params", "accuracy_vs_memory")


def run_sweep(sweep_dir: Path, *overrides: str) -> Path:
    env = {**os.environ, "VLM_ADAPT_CACHE_DIR": str(sweep_dir.parent / "cache")}
    command = [sys.executable, "-m", "vlm_adapt", "train", "-m", *SWEEP_FAST, *overrides,
               f"hydra.sweep.dir={sweep_dir}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return sweep_dir


@pytest.fixture(scope="module")
def base2new_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`vlm-adapt train -m method=zero_shot,coop seed=1,2 protocol=base2new`: four real runs."""
    root = tmp_path_factory.mktemp("sweeps")
    return run_sweep(root / "base2new", "method=zero_shot,coop", "seed=1,2", "protocol=base2new")


@pytest.fixture
def sweep_copy(base2new_sweep: Path, tmp_path: Path) -> Path:
    """A private copy, for tests that break runs."""
    return Path(shutil.copytree(base2new_sweep, tmp_path / "base2new"))


def report(*args: str | Path) -> None:
    vlm_adapt_main(["report", *map(str, args)])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def records(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]


def assert_stat(row: dict[str, str], column: str, values: list[float]) -> None:
    assert int(row[f"{column} n"]) == len(values)
    assert float(row[f"{column} mean"]) == pytest.approx(statistics.fmean(values), abs=1e-9)
    assert float(row[f"{column} std"]) == pytest.approx(statistics.pstdev(values), abs=1e-9)


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG" and min(image.size) > 200


def test_report_tables_match_the_runs_metrics(base2new_sweep, tmp_path):
    out = tmp_path / "report"
    report(base2new_sweep, "--out", out, "--latex")

    by_method: dict[str, list[dict]] = defaultdict(list)
    for record in records(base2new_sweep):
        assert record["status"] == "completed" and record["random_init"]
        by_method[record["method"]].append(record)
    rows = read_csv(out / "base2new.csv")
    assert {(r["Dataset"], r["Method"]) for r in rows} == {
        (d, m) for d in ("imagenette", "average (1 dataset)") for m in ("zero_shot", "coop")}
    for row in rows:
        runs = by_method[row["Method"]]
        assert row["Backbone"] == "vlm-tiny (random-init)"
        assert_stat(row, "Base", [r["metrics"]["test/base/acc"] for r in runs])
        assert_stat(row, "New", [r["metrics"]["test/new/acc"] for r in runs])
        hm = ([r["metrics"]["test/hm"] for r in runs] if row["Dataset"] == "imagenette" else
              [harmonic_mean(r["metrics"]["test/base/acc"], r["metrics"]["test/new/acc"]) for r in runs])
        assert float(row["HM mean"]) == pytest.approx(statistics.fmean(hm), abs=1e-3)

    cost = read_csv(out / "cost.csv")
    assert sorted(row["Method"] for row in cost) == ["coop", "zero_shot"]
    for row in cost:
        runs = by_method[row["Method"]]
        assert_stat(row, "Trainable params", [r["cost"]["trainable_params"] for r in runs])
        assert_stat(row, "Peak memory (MB)", [r["cost"]["peak_memory_mb"] for r in runs])
        assert_stat(row, "Wall time (s)", [r["cost"]["wall_time_s"] for r in runs])
    assert {row["Method"]: row["Trainable params mean"] for row in cost} == {"coop": "1024.0", "zero_shot": "0.0"}

    markdown = (out / "report.md").read_text()
    assert "Random-init backbones" in markdown and "| vlm-tiny (random-init) |" in markdown
    assert "Missing or failed" not in markdown and not read_csv(out / "problems.csv")
    for name in ("base2new", "cost"):
        assert (out / f"{name}.tex").read_text().startswith("% ")
    assert not (out / "accuracy_vs_shots.png").exists()  # no few-shot runs in this sweep
    for name in PLOTS[1:]:
        assert_png(out / f"{name}.png")


def test_comparison_table_has_the_papers_layout_from_a_real_sweep(base2new_sweep, tmp_path):
    """Methods as rows, average Base / New / HM, each dataset's HM as a column, the cost beside them."""
    out = tmp_path / "report"
    report(base2new_sweep, "--out", out)
    rows = {row["Method"]: row for row in read_csv(out / "comparison.csv")}
    assert set(rows) == {"zero_shot", "coop"}
    by_method: dict[str, list[dict]] = defaultdict(list)
    for record in records(base2new_sweep):
        by_method[record["method"]].append(record)
    for method, row in rows.items():
        runs = by_method[method]
        assert row["Datasets"] == "1"
        assert_stat(row, "Base", [r["metrics"]["test/base/acc"] for r in runs])
        assert_stat(row, "imagenette", [r["metrics"]["test/hm"] for r in runs])
        fit_times = [r["cost"]["fit_time_s"] for r in runs if "fit_time_s" in r["cost"]]
        assert len(fit_times) == (0 if method == "zero_shot" else len(runs))  # zero-shot does not fit
        if fit_times:
            assert_stat(row, "Train time (s)", fit_times)
        else:
            assert row["Train time (s) n"] == "0"
        assert_stat(row, "Trainable params", [r["cost"]["trainable_params"] for r in runs])
    assert "### Base-to-new comparison" in (out / "report.md").read_text()


def _b2n_run(method: str, dataset: str, seed: int, base: float, new: float, seconds: float) -> Run:
    return Run(Path(f"/runs/{method}/{dataset}/{seed}"), "completed", method, dataset, "base2new", 16, seed,
               "ViT-B-16", None, True, metrics={"test/base/acc": base, "test/new/acc": new,
                                                "test/hm": harmonic_mean(base, new)},
               cost={"trainable_params": 10, "fit_time_s": seconds, "train_memory_mb": 5.0, "peak_memory_mb": 9.0})


def test_comparison_table_orders_datasets_as_the_papers_and_leaves_missing_cells_empty():
    runs = [_b2n_run("coop", "dtd", seed, 80 + seed, 60, 10 * seed) for seed in (1, 2)]
    runs += [_b2n_run("coop", "imagenet", seed, 70, 50 + seed, 5) for seed in (1, 2)]
    runs += [_b2n_run("maple", "dtd", 1, 90, 90, 7)]
    table = comparison_table(runs)
    assert table.columns[7:9] == ["imagenet", "dtd"]  # ImageNet first, as in the papers, whatever the run order
    coop, maple = table.rows  # lowest average HM first
    assert (coop[0], maple[0]) == ("coop", "maple")
    assert maple[7] is None and maple[8].values == (90.0,)
    per_seed_hm = [harmonic_mean((80 + s + 70) / 2, (60 + 50 + s) / 2) for s in (1, 2)]
    assert coop[6].values == pytest.approx(per_seed_hm)
    assert coop[4].values == pytest.approx([75.5, 76.0])
    assert coop[8].values == pytest.approx([harmonic_mean(81, 60), harmonic_mean(82, 60)])
    assert coop[9].values == (10.0,) * 4 and coop[10].values == pytest.approx([10, 20, 5, 5])


@pytest.mark.slow
def test_few_shot_table_and_curve_from_a_shots_sweep(base2new_sweep, tmp_path):
    few_shot = run_sweep(tmp_path / "few_shot", "method=coop", "protocol=few_shot", "protocol.shots=1,2", "seed=1,2")
    out = tmp_path / "report"
    report(base2new_sweep, few_shot, "--out", out)
    acc: dict[int, list[float]] = defaultdict(list)
    for record in records(few_shot):
        acc[record["shots"]].append(record["metrics"]["test/imagenette/acc"])
    (row,) = read_csv(out / "few_shot.csv")
    assert (row["Dataset"], row["Method"], row["Backbone"]) == ("imagenette", "coop", "vlm-tiny (random-init)")
    assert_stat(row, "1 shot", acc[1])
    assert_stat(row, "2 shots", acc[2])
    assert len(read_csv(out / "cost.csv")) == 4  # base2new zero-shot and CoOp, few-shot CoOp at 1 and 2 shots
    for name in PLOTS:
        assert_png(out / f"{name}.png")


def test_missing_and_failed_runs_are_listed_and_not_averaged(sweep_copy, tmp_path):
    sweep = sweep_copy
    by_dir = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    coop_dirs = sorted(d for d, r in by_dir.items() if r["method"] == "coop")
    zero_shot_dirs = sorted(d for d, r in by_dir.items() if r["method"] == "zero_shot")
    (sweep / coop_dirs[1] / "metrics.json").unlink()  # a job that died before writing its metrics
    failed = by_dir[zero_shot_dirs[0]] | {"status": "failed", "error": "RuntimeError: out of memory"}
    (sweep / zero_shot_dirs[0] / "metrics.json").write_text(json.dumps(failed))

    out = tmp_path / "report"
    report(sweep, "--out", out)
    problems = {Path(r["Run directory"]).name: r for r in read_csv(out / "problems.csv")}
    assert set(problems) == {coop_dirs[1], zero_shot_dirs[0]}
    assert problems[coop_dirs[1]]["Status"] == "missing" and problems[coop_dirs[1]]["Method"] == "coop"
    assert problems[zero_shot_dirs[0]]["Status"] == "failed"
    assert "out of memory" in problems[zero_shot_dirs[0]]["Reason"]

    rows = {(r["Dataset"], r["Method"]): r for r in read_csv(out / "base2new.csv")}
    for method, kept in (("coop", coop_dirs[0]), ("zero_shot", zero_shot_dirs[1])):
        for dataset in ("imagenette", "average (1 dataset)"):
            assert_stat(rows[(dataset, method)], "Base", [by_dir[kept]["metrics"]["test/base/acc"]])
    markdown = (out / "report.md").read_text()
    assert "Missing or failed runs" in markdown and coop_dirs[1] in markdown


def test_runs_with_different_settings_get_separate_rows(sweep_copy, tmp_path):
    """Two CoOp runs whose configs differ in more than the seed are two experiments, not one mean."""
    sweep = sweep_copy
    coop_dir = next(p.parent for p in sorted(sweep.glob("*/metrics.json"))
                    if json.loads(p.read_text())["method"] == "coop")
    config = coop_dir / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("n_ctx: 16", "n_ctx: 4"))
    out = tmp_path / "report"
    report(sweep, "--out", out)
    methods = {r["Method"] for r in read_csv(out / "base2new.csv") if r["Dataset"] == "imagenette"}
    assert methods == {"zero_shot", "coop [module.n_ctx=4]", "coop [module.n_ctx=16]"}


def test_report_without_runs_names_the_expected_folders(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report(tmp_path)
    assert exit_info.value.code == 2
    assert "No run directories" in capsys.readouterr().err


@pytest.mark.slow
def test_table_scripts_run_the_sweep_and_the_report(tmp_path):
    """experiments/base2new.sh narrowed to one zero-shot job: the sweep runs and the report lands beside it."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "SWEEP_DIR": str(sweep), "VLM_ADAPT": f"{sys.executable} -m vlm_adapt",
           "VLM_ADAPT_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        ["bash", str(REPO / "experiments" / "base2new.sh"), *SWEEP_FAST, "method=zero_shot", "data=imagenette",
         "seed=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = records(sweep)
    assert (record["protocol"], record["dataset"], record["task_name"]) == ("base2new", "imagenette", "paper_base2new")
    (row,) = [r for r in read_csv(sweep / "report" / "base2new.csv") if r["Dataset"] == "imagenette"]
    assert_stat(row, "HM", [record["metrics"]["test/hm"]])
