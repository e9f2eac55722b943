"""`vlm-adapt bench`: medians over repeats, ratios to full fine-tuning, one process per (repeat, method),
the bench dataset, clear errors for bad method lists, and a real run on the tiny backbone."""

import csv
import json
import statistics
from pathlib import Path

import pytest

from vlm_adapt.bench import aggregate, check_methods, markdown_table, run_bench, write_bench_split
from vlm_adapt.errors import ConfigError
from vlm_adapt.train import train

IMAGENET_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-samples"


def run(method: str, repeat: int, time_s: float, memory_mb: float, params: int = 100, extra_s: float = 0.0):
    return {"method": method, "repeat": repeat, "status": "completed", "trainable_params": params,
            "peak_memory_mb": memory_mb + 1000, "train_memory_mb": memory_mb, "time_per_step_s": time_s,
            "epoch_extra_s": extra_s, "step_with_extra_s": time_s + extra_s / 4, "first_epoch_extra_s": 1.0,
            "startup_s": 0.5, "cpu_time_per_step_s": 2 * time_s}


def test_aggregate_reports_medians_over_repeats_and_ratios_to_the_baseline():
    runs = [
        run("ft", 1, 8.0, 2000, params=1000), run("ft", 2, 10.0, 2400, params=1000),
        run("ft", 3, 30.0, 2200, params=1000),
        run("coop", 1, 3.0, 300, extra_s=4.0), run("coop", 2, 2.0, 500, extra_s=8.0), run("coop", 3, 4.0, 400),
        {"method": "coop", "repeat": 4, "status": "failed"},
    ]
    ft, coop = aggregate(runs, ["ft", "coop"], baseline="ft")
    assert (ft["time_per_step_s"], ft["train_memory_mb"], ft["repeats"]) == (10.0, 2200, 3)
    assert (coop["time_per_step_s"], coop["train_memory_mb"], coop["repeats"]) == (3.0, 400, 3)
    assert coop["epoch_extra_s"] == 4.0
    assert all(ft[key] == 1.0 for key in ("params_ratio", "train_memory_ratio", "time_ratio", "time_with_extra_ratio"))
    assert coop["time_ratio"] == pytest.approx(0.3) and coop["train_memory_ratio"] == pytest.approx(400 / 2200)
    assert coop["params_ratio"] == pytest.approx(0.1) and coop["cpu_time_ratio"] == pytest.approx(0.3)
    table = markdown_table([ft, coop], "ft")
    assert table.splitlines()[0].startswith("| method | trainable params | x ft")
    assert "| ft | 1,000 | 1 |" in table and "| coop | 100 | 0.1 |" in table


def test_bench_split_has_the_class_count_and_whole_batches_of_one_label(tmp_path):
    split = json.loads(write_bench_split(tmp_path / "split.json", IMAGENET_SAMPLES, 100, 4, 3).read_text())
    assert len(split["train"]) == 12 and len({path for path, _, _ in split["train"]}) == 12
    assert [label for _, label, _ in split["train"]] == [0] * 4 + [1] * 4 + [2] * 4
    assert [label for _, label, _ in split["test"]] == list(range(100))
    with pytest.raises(ConfigError, match="bench.num_classes=1001"):
        write_bench_split(tmp_path / "split.json", IMAGENET_SAMPLES, 1001, 4, 3)


@pytest.mark.parametrize(
    ("methods", "baseline", "message"),
    [
        (["ft", "no_such_method"], "ft", "no config for \\['no_such_method'\\]"),
        (["ft", "zero_shot"], "ft", "zero_shot.*does not train"),
        (["ft", "zero_shot_ensemble"], "ft", "zero_shot_ensemble.*does not train"),
        (["coop"], "ft", "bench.baseline='ft' is not in bench.methods"),
        ([], "ft", "bench.methods is empty"),
    ],
)
def test_bad_method_lists_are_clear_errors(methods, baseline, message):
    with pytest.raises(ConfigError, match=message):
        check_methods(methods, baseline)


def test_bench_runs_every_method_in_its_own_process_and_saves_the_table(make_cfg, tmp_path, capsys):
    cfg = make_cfg("backbone=tiny", "bench.methods=[ft,coop]", "bench.repeats=2", "bench.steps=2",
                   "bench.num_threads=1", "bench.batch_size=4", fast=False, config_name="bench")
    rows = run_bench(cfg)
    out = tmp_path / "run"
    assert [row["method"] for row in rows] == ["ft", "coop"]
    record = json.loads((out / "bench.json").read_text())
    runs = record["runs"]
    assert sorted((r["method"], r["repeat"]) for r in runs) == [("coop", 1), ("coop", 2), ("ft", 1), ("ft", 2)]
    assert [r["method"] for r in runs] == ["ft", "coop", "coop", "ft"]  # interleaved, order rotated per repeat
    for row in record["table"]:
        mine = [r for r in runs if r["method"] == row["method"]]
        assert row["time_per_step_s"] == pytest.approx(statistics.median(r["time_per_step_s"] for r in mine))
        assert row["train_memory_mb"] == pytest.approx(statistics.median(r["train_memory_mb"] for r in mine))
    ft, coop = rows
    assert ft["time_ratio"] == ft["train_memory_ratio"] == ft["params_ratio"] == 1.0
    assert coop["trainable_params"] == 16 * 64 and coop["params_ratio"] < 0.01
    # each process ran the real training loop and wrote its own metrics.json, without its checkpoint
    for r in runs:
        job = Path(r["job_dir"])
        assert json.loads((job / "metrics.json").read_text())["cost"]["train_steps"] == 2 * 2
        assert [len(epoch["step_s"]) for epoch in r["epochs"]] == [2, 2]
        assert not (job / "checkpoints").exists()
    with open(out / "bench.csv") as f:
        assert [line["method"] for line in csv.DictReader(f)] == ["ft", "coop"]
    assert "| coop | 1,024 |" in (out / "bench.md").read_text()
    assert "| ft | " in capsys.readouterr().out


def test_bench_job_config_is_a_valid_train_config(make_cfg, tmp_path):
    """What a bench process runs is `train` on the bench dataset: check it end to end in this process."""
    from vlm_adapt.bench import job_config

    bench = make_cfg("backbone=tiny", "bench.steps=2", "bench.batch_size=4", fast=False, config_name="bench")
    split = write_bench_split(tmp_path / "split.json", IMAGENET_SAMPLES, 10, 4, 2)
    job = job_config(bench, "clipfit", tmp_path / "job", split, "cpu")
    assert job.trainer.limit_train_batches == 2 and job.trainer.max_epochs == 2 and job.method.batch_size == 4
    assert job.backbone.model_name == "vlm-tiny" and job.data.name == "bench" and job.logger == {}
    train(job)
    timing = json.loads((tmp_path / "job" / "timing.json").read_text())
    assert timing["batches_per_epoch"] == 2 and [len(epoch["step_s"]) for epoch in timing["epochs"]] == [2, 2]
    assert json.loads((tmp_path / "job" / "metrics.json").read_text())["cost"]["train_steps"] == 4
