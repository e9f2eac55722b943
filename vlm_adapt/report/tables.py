"""The paper tables, built from completed runs: base-to-new, few-shot, cross-dataset targets, cost.

Rows are experiment cells (method variant x backbone x dataset x shots); cells hold a `Stat` over
seeds. "average" rows average datasets per seed, over the seeds every dataset of the row has.
Runs that completed without a metric their table needs are returned as problems, not averaged.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from vlm_adapt.report.runs import Run
from vlm_adapt.report.stats import DatasetAverage, SeedValues, Stat, average_over_datasets, harmonic_mean

Cell = str | int | float | Stat | None


@dataclass
class Table:
    """A titled table; `formats` maps a column to its number format (default two decimals)."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)
    show_zero_std: bool = True  # "± 0.00" says the seeds agreed; the cost table leaves it out


@dataclass(frozen=True)
class Problem:
    run: Run
    reason: str


def _rows_key(run: Run) -> tuple[str, str]:
    return run.label, run.backbone_label


def _average_name(n_datasets: int) -> str:
    return f"average ({n_datasets} dataset{'s' if n_datasets != 1 else ''})"


def _dropped_note(label: str, dropped: dict[str, tuple[int, ...]], what: str = "") -> list[str]:
    return [
        f"{label}{what}: average leaves out seed(s) {', '.join(map(str, seeds))} of {dataset} "
        "(not run on every dataset of the average)"
        for dataset, seeds in sorted(dropped.items())
    ]


# ---------------------------------------------------------------- base-to-new
Base2NewCells = dict[tuple, dict[str, dict[str, SeedValues]]]  # (label, backbone, shots) -> dataset -> metric -> seeds
BASE2NEW_METRICS = {"base": "test/base/acc", "new": "test/new/acc", "hm": "test/hm"}


def _base2new_cells(runs: list[Run]) -> tuple[Base2NewCells, list[Problem]]:
    """The completed base2new runs' Base, New and HM, per method variant, dataset and seed."""
    problems: list[Problem] = []
    cells: Base2NewCells = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        if not (run.completed and run.protocol == "base2new"):
            continue
        missing = [key for key in BASE2NEW_METRICS.values() if key not in run.metrics]
        if missing:
            problems.append(Problem(run, f"completed without {', '.join(missing)}"))
            continue
        per_metric = cells[(*_rows_key(run), run.shots)].setdefault(run.dataset, {m: {} for m in BASE2NEW_METRICS})
        for name, key in BASE2NEW_METRICS.items():
            per_metric[name].setdefault(run.seed, []).append(run.metrics[key])
    return cells, problems


def _pooled(by_seed: SeedValues) -> Stat:
    """A dataset's cell: every run's value, over its seeds."""
    return Stat.of(v for values in by_seed.values() for v in values)


def _base2new_averages(per_dataset: dict[str, dict[str, SeedValues]]) -> dict[str, DatasetAverage]:
    """Per seed, the mean Base and New over datasets, and the HM of those two means."""
    return {
        "base": average_over_datasets(per_dataset, metric="base"),
        "new": average_over_datasets(per_dataset, metric="new"),
        "hm": average_over_datasets(per_dataset, combine=lambda m: harmonic_mean(m["base"], m["new"])),
    }


def base2new_table(runs: list[Run]) -> tuple[Table, list[Problem]]:
    """Base, New, HM per dataset and their average, per method variant (protocol base2new)."""
    columns = ["Dataset", "Method", "Backbone", "Shots", "Base", "New", "HM"]
    table = Table("base2new", "Base-to-new generalization", columns)
    cells, problems = _base2new_cells(runs)
    for (label, backbone, shots), per_dataset in sorted(cells.items(), key=lambda kv: _sort_key(kv[0])):
        averages = _base2new_averages(per_dataset)
        table.rows.append([_average_name(len(per_dataset)), label, backbone, shots,
                           averages["base"].stat, averages["new"].stat, averages["hm"].stat])
        table.notes += _dropped_note(label, averages["base"].dropped)
        for dataset, metrics in sorted(per_dataset.items()):
            stats = [_pooled(metrics[m]) for m in ("base", "new", "hm")]
            table.rows.append([dataset, label, backbone, shots, *stats])
    table.rows.sort(key=lambda row: (not str(row[0]).startswith("average"), str(row[0]), str(row[1]), str(row[2])))
    table.notes.append(
        "Mean ± std (population) over seeds; HM per dataset is the mean of each seed's HM; the average "
        "row takes, per seed, the mean Base and New over datasets and their HM."
    )
    return table, problems


# The papers' column order (CoOp's DATASETS.md, the CoCoOp / MaPLe / PromptSRC tables); other datasets follow, sorted.
PAPER_DATASET_ORDER = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                       "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
COMPARISON_COST_COLUMNS = {
    "Trainable params": "trainable_params",
    "Train time (s)": "fit_time_s",
    "Train memory (MB)": "train_memory_mb",
    "Peak memory (MB)": "peak_memory_mb",
}


def _paper_order(datasets: set[str]) -> list[str]:
    known = [name for name in PAPER_DATASET_ORDER if name in datasets]
    return known + sorted(datasets - set(known))


def comparison_table(runs: list[Run]) -> Table:
    """The base-to-new comparison table in the papers' layout: one row per method variant, the average Base,
    New and HM, then each dataset's HM as a column, then the cost of a run (means over its runs)."""
    cells, _ = _base2new_cells(runs)
    datasets = _paper_order({dataset for per_dataset in cells.values() for dataset in per_dataset})
    table = Table("comparison", "Base-to-new comparison (HM per dataset, cost per run)",
                  ["Method", "Backbone", "Shots", "Datasets", "Base", "New", "HM", *datasets, *COMPARISON_COST_COLUMNS],
                  formats={"Datasets": "{}", "Trainable params": "{:,.0f}", "Train time (s)": "{:.1f}",
                           "Train memory (MB)": "{:.0f}", "Peak memory (MB)": "{:.0f}"}, show_zero_std=False)
    by_key: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        if run.completed and run.protocol == "base2new" and run.cost:
            by_key[(run.label, run.backbone_label, run.shots)].append(run)
    for key, per_dataset in sorted(cells.items(), key=lambda kv: _sort_key(kv[0])):
        averages = _base2new_averages(per_dataset)
        hm_per_dataset = [
            _pooled(per_dataset[name]["hm"]) if name in per_dataset else None for name in datasets
        ]
        cost = [_cost_stat(by_key[key], field_) for field_ in COMPARISON_COST_COLUMNS.values()]
        table.rows.append([*key, len(per_dataset), averages["base"].stat, averages["new"].stat, averages["hm"].stat,
                           *hm_per_dataset, *cost])
        table.notes += _dropped_note(key[0], averages["base"].dropped)
    table.rows.sort(key=lambda row: (row[6].mean if row[6] and row[6].n else float("-inf")))
    table.notes.append(
        "Rows from the lowest to the highest average HM. Base, New, HM: the average over the row's datasets "
        "(per seed, the mean Base and New over datasets and their HM), mean over seeds; each dataset column is "
        "that dataset's HM, mean over seeds (empty: not run). Cost: mean over the row's runs of the trainable "
        "parameters, the time `fit` took, the memory training added over the loaded model and the peak memory."
    )
    return table


def _sort_key(key: tuple) -> tuple:
    return tuple("" if k is None else str(k) for k in key)


# ---------------------------------------------------------------- few-shot
FewShotCurves = dict[tuple[str, str], dict[str, dict[int, Stat]]]  # (method, backbone) -> dataset -> shots -> Stat


def few_shot_curves(runs: list[Run]) -> tuple[FewShotCurves, list[str], list[Problem]]:
    """Accuracy per shot count for each method variant and dataset, plus an "average" curve."""
    problems: list[Problem] = []
    values: dict[tuple[str, str], dict[int, dict[str, dict[str, SeedValues]]]] = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        if not (run.completed and run.protocol == "few_shot"):
            continue
        key = f"test/{run.dataset}/acc"
        if key not in run.metrics or run.shots is None:
            problems.append(Problem(run, f"completed without {key}" if run.shots is not None else "no shot count"))
            continue
        by_dataset = values[_rows_key(run)][int(run.shots)]
        by_dataset.setdefault(run.dataset, {"acc": {}})["acc"].setdefault(run.seed, []).append(run.metrics[key])

    curves: FewShotCurves = {}
    notes: list[str] = []
    for row_key, by_shots in values.items():
        curve: dict[str, dict[int, Stat]] = defaultdict(dict)
        datasets = set()
        for shots, per_dataset in by_shots.items():
            for dataset, metrics in per_dataset.items():
                curve[dataset][shots] = Stat.of(v for vs in metrics["acc"].values() for v in vs)
                datasets.add(dataset)
        if len(datasets) > 1:
            for shots, per_dataset in by_shots.items():
                if len(per_dataset) < len(datasets):
                    notes.append(f"{row_key[0]}: no average at {shots} shots (only {len(per_dataset)} of "
                                 f"{len(datasets)} datasets ran)")
                    continue
                average = average_over_datasets(per_dataset)
                curve[_average_name(len(datasets))][shots] = average.stat
                notes += _dropped_note(row_key[0], average.dropped, f" at {shots} shots")
        curves[row_key] = dict(curve)
    return curves, notes, problems


def few_shot_table(runs: list[Run]) -> tuple[Table, list[Problem]]:
    """Accuracy per shot count (columns) per method variant and dataset (rows), protocol few_shot."""
    curves, notes, problems = few_shot_curves(runs)
    shots = sorted({k for curve in curves.values() for by_shots in curve.values() for k in by_shots})
    columns = [f"{k} shot{'s' if k != 1 else ''}" for k in shots]
    table = Table("few_shot", "Few-shot accuracy", ["Dataset", "Method", "Backbone", *columns], notes=notes)
    for (label, backbone), curve in curves.items():
        for dataset, by_shots in curve.items():
            table.rows.append([dataset, label, backbone, *(by_shots.get(k) for k in shots)])
    table.rows.sort(key=lambda row: (not str(row[0]).startswith("average"), str(row[0]), str(row[1]), str(row[2])))
    table.notes.append("Test accuracy (%), mean ± std (population) over seeds; averages are taken per seed.")
    return table, problems


# ---------------------------------------------------------------- cross-dataset / domain generalization
def target_tables(runs: list[Run]) -> tuple[list[Table], list[Problem]]:
    """One table per protocol with target datasets: source accuracy, each target, mean over targets."""
    problems: list[Problem] = []
    by_protocol: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if not (run.completed and run.targets):
            continue
        needed = [f"test/{name}/acc" for name in (run.dataset, *run.targets)]
        missing = [key for key in needed if key not in run.metrics]
        if missing:
            problems.append(Problem(run, f"completed without {', '.join(missing)}"))
            continue
        by_protocol[run.protocol].append(run)

    tables = []
    for protocol, members in sorted(by_protocol.items()):
        targets = list(dict.fromkeys(name for run in members for name in run.targets))
        cells: dict[tuple, list[Run]] = defaultdict(list)
        for run in members:
            cells[(run.dataset, *_rows_key(run), run.shots)].append(run)
        name = f"{protocol}_targets" if protocol in RESERVED_NAMES else protocol
        table = Table(name, _TITLES.get(protocol, f"{protocol}: target datasets"),
                      ["Source", "Method", "Backbone", "Shots", "Source acc", *targets, "Target mean"])
        for (source, label, backbone, shots), group in sorted(cells.items(), key=lambda kv: _sort_key(kv[0])):
            per_target = [Stat.of(r.metrics[f"test/{t}/acc"] for r in group if t in r.targets) for t in targets]
            target_mean = Stat.of(sum(r.metrics[f"test/{t}/acc"] for t in r.targets) / len(r.targets) for r in group)
            source_acc = Stat.of(r.metrics[f"test/{source}/acc"] for r in group)
            table.rows.append([source, label, backbone, shots, source_acc, *per_target, target_mean])
        table.notes.append("Test accuracy (%) in each dataset's own label space, mean ± std (population) over "
                           "seeds; Target mean is each run's mean over its targets, then over seeds.")
        tables.append(table)
    return tables, problems


RESERVED_NAMES = {"base2new", "comparison", "few_shot", "cost", "problems", "runs"}  # other tables' file names
_TITLES = {"cross_dataset": "Cross-dataset transfer", "domain_generalization": "Domain generalization"}


# ---------------------------------------------------------------- cost
COST_COLUMNS = {
    "Trainable params": "trainable_params",
    "Total params": "total_params",
    "Peak memory (MB)": "peak_memory_mb",
    "Train memory (MB)": "train_memory_mb",
    "Time/step (s)": "time_per_step_s",
    "Wall time (s)": "wall_time_s",
}


def _cost_stat(group: list[Run], key: str) -> Stat | None:
    values = [r.cost[key] for r in group if isinstance(r.cost.get(key), (int, float))]
    return Stat.of(values) if values else None


def cost_table(runs: list[Run]) -> Table:
    """Trainable parameters, peak and training memory, time per step and wall time per experiment cell."""
    cells: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        if run.completed and run.cost:
            cells[(run.protocol, run.dataset, run.shots, *_rows_key(run), run.cost.get("device", "?"))].append(run)
    columns = ["Protocol", "Dataset", "Shots", "Method", "Backbone", "Device", *COST_COLUMNS, "Trainable %", "Runs"]
    table = Table("cost", "Cost", columns, formats={
        "Trainable params": "{:,.0f}", "Total params": "{:,.0f}", "Peak memory (MB)": "{:.0f}",
        "Train memory (MB)": "{:.0f}", "Time/step (s)": "{:.4f}", "Wall time (s)": "{:.1f}", "Trainable %": "{:.4f}",
        "Runs": "{}",
    }, show_zero_std=False)
    for key, group in sorted(cells.items(), key=lambda kv: _sort_key(kv[0])):
        stats = {column: _cost_stat(group, field_) for column, field_ in COST_COLUMNS.items()}
        trainable, total = stats["Trainable params"], stats["Total params"]
        share = 100 * trainable.mean / total.mean if trainable and total and total.mean else None
        table.rows.append([*key, *stats.values(), share, len(group)])
    table.notes.append(
        "Means over seeds (± std where runs differ). Peak memory: CUDA allocator peak on GPU, process peak "
        "RSS on CPU; train memory: what training added over the loaded model; time/step excludes the first "
        "(warm-up) step."
    )
    return table


# ---------------------------------------------------------------- headline points for the plots
@dataclass(frozen=True)
class Point:
    """One method variant in one setting: headline accuracy averaged over datasets, and its cost."""

    setting: str
    label: str
    backbone: str
    accuracy: float
    trainable_params: float | None
    peak_memory_mb: float | None
    datasets: int


def headline_accuracy(run: Run) -> float | None:
    """The figure a paper reports for a run: HM (base2new), mean target accuracy, else test accuracy."""
    if run.protocol == "base2new":
        return run.metrics.get("test/hm")
    if run.targets:
        values = [run.metrics.get(f"test/{t}/acc") for t in run.targets]
        return None if None in values else sum(values) / len(values)
    return run.metrics.get(f"test/{run.dataset}/acc")


HEADLINE_NAMES = {"base2new": "HM", "few_shot": "accuracy"}


def setting_name(run: Run) -> str:
    what = "target mean" if run.targets else HEADLINE_NAMES.get(run.protocol, "accuracy")
    return f"{run.protocol}, {run.shots} shots ({what})" if run.shots else f"{run.protocol} ({what})"


def headline_points(runs: list[Run]) -> list[Point]:
    """Per (setting, method variant, backbone): mean over datasets of the per-dataset mean over seeds."""
    cells: dict[tuple[str, str, str], dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.completed and headline_accuracy(run) is not None:
            cells[(setting_name(run), *_rows_key(run))][run.dataset].append(run)
    points = []
    for (setting, label, backbone), per_dataset in sorted(cells.items()):
        group = [run for members in per_dataset.values() for run in members]
        accuracy = _mean([_mean([headline_accuracy(r) for r in members]) for members in per_dataset.values()])
        params, memory = _cost_stat(group, "trainable_params"), _cost_stat(group, "peak_memory_mb")
        points.append(Point(setting, label, backbone, accuracy, params.mean if params else None,
                            memory.mean if memory else None, len(per_dataset)))
    return points


def _mean(values: list[Any]) -> float:
    return sum(values) / len(values)


# ---------------------------------------------------------------- problems
def problems_table(runs: list[Run], problems: list[Problem]) -> Table:
    """Runs that did not complete, or completed without a figure their table needed: never averaged."""
    table = Table("problems", "Missing or failed runs (left out of every table)",
                  ["Run directory", "Status", "Method", "Dataset", "Protocol", "Shots", "Seed", "Reason"])
    for run in runs:
        if not run.completed:
            reason = run.error or ("no metrics.json: the run died, is still running, or never started"
                                   if run.status == "missing" else f"status {run.status}")
            table.rows.append([str(run.path), run.status, run.label, run.dataset, run.protocol, run.shots, run.seed,
                               reason])
    for problem in problems:
        run = problem.run
        table.rows.append([str(run.path), "incomplete", run.label, run.dataset, run.protocol, run.shots, run.seed,
                           problem.reason])
    return table
