"""Everything `vlm-adapt report` writes for a set of sweep directories: tables, CSV, LaTeX, plots."""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from vlm_adapt.report.plots import plot_accuracy_vs_cost, plot_accuracy_vs_shots
from vlm_adapt.report.render import to_latex, to_markdown, write_csv
from vlm_adapt.report.runs import Run, load_runs, variant_legend
from vlm_adapt.report.tables import (
    Table,
    base2new_table,
    comparison_table,
    cost_table,
    few_shot_curves,
    few_shot_table,
    headline_points,
    problems_table,
    target_tables,
)

RANDOM_INIT_WARNING = (
    "**Random-init backbones**: rows whose backbone says `random-init` come from models without "
    "pretrained weights; their accuracies measure the plumbing, not CLIP."
)


@dataclass
class Report:
    """What was written, for the caller to print or check."""

    out_dir: Path
    runs: list[Run]
    tables: dict[str, Table]
    files: list[Path] = field(default_factory=list)

    @property
    def problems(self) -> Table:
        return self.tables["problems"]


def build_tables(runs: list[Run]) -> dict[str, Table]:
    """Every table with at least one row, plus the (possibly empty) list of missing or failed runs."""
    b2n, b2n_problems = base2new_table(runs)
    fs, fs_problems = few_shot_table(runs)
    targets, target_problems = target_tables(runs)
    tables = {t.name: t for t in (comparison_table(runs), b2n, fs, *targets, cost_table(runs)) if t.rows}
    tables["problems"] = problems_table(runs, b2n_problems + fs_problems + target_problems)
    return tables


def write_runs_csv(runs: list[Run], path: Path) -> Path:
    """One line per run directory with its identity, status, every metric and cost figure."""
    metric_keys = sorted({k for run in runs for k in run.metrics})
    cost_keys = sorted({k for run in runs for k in run.cost})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_dir", "status", "method", "variant", "dataset", "protocol", "shots", "seed", "backbone",
                         "pretrained", "random_init", *metric_keys, *(f"cost/{k}" for k in cost_keys), "error"])
        for run in runs:
            writer.writerow([run.path, run.status, run.method, run.variant, run.dataset, run.protocol, run.shots,
                             run.seed, run.backbone, run.pretrained, run.random_init,
                             *(run.metrics.get(k, "") for k in metric_keys), *(run.cost.get(k, "") for k in cost_keys),
                             run.error or ""])
    return path


def repeated_runs(runs: list[Run]) -> list[str]:
    """Completed runs sharing settings and seed (a sweep reported twice, a rerun): each one is counted."""
    seen: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        if run.completed:
            seen[(run.label, run.backbone_label, run.protocol, run.dataset, run.shots, run.seed)].append(run)
    return [
        f"{key[0]} on {key[3]} ({key[2]}, {key[4]} shots) seed {key[5]}: {len(group)} runs, each counted "
        f"({', '.join(str(run.path) for run in group)})"
        for key, group in seen.items() if len(group) > 1
    ]


def _markdown(roots: list[Path], runs: list[Run], tables: dict[str, Table], plots: list[Path]) -> str:
    completed = sum(run.completed for run in runs)
    lines = ["# vlm_adapt report", "", "Sources: " + ", ".join(f"`{root}`" for root in roots), "",
             f"{len(runs)} run directories: {completed} completed, {len(runs) - completed} missing or failed.", ""]
    if any(run.random_init for run in runs):
        lines += [RANDOM_INIT_WARNING, ""]
    legend = variant_legend(runs)
    if legend:
        lines += ["Variants (settings that differ between runs of one method in the same cell):", ""]
        lines += [f"- {entry}" for entry in legend] + [""]
    repeats = repeated_runs(runs)
    if repeats:
        lines += ["Repeated runs (same settings and seed):", ""] + [f"- {entry}" for entry in repeats] + [""]
    problems = tables["problems"]
    if problems.rows:
        lines += [to_markdown(problems)]
    for name, table in tables.items():
        if name != "problems":
            lines += [to_markdown(table)]
    if plots:
        lines += ["### Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def write_report(roots: list[str | Path], out_dir: str | Path, latex: bool = False) -> Report:
    """Read every run under `roots` and write report.md, <table>.csv (and .tex), runs.csv and the PNGs."""
    roots = [Path(root) for root in roots]
    runs = load_runs(roots)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(runs)
    report = Report(out, runs, tables)

    plots = [
        plot_accuracy_vs_shots(few_shot_curves(runs)[0], out / "accuracy_vs_shots.png"),
        plot_accuracy_vs_cost(headline_points(runs), "trainable_params", out / "accuracy_vs_params.png"),
        plot_accuracy_vs_cost(headline_points(runs), "peak_memory_mb", out / "accuracy_vs_memory.png"),
    ]
    plots = [p for p in plots if p is not None]
    for name, table in tables.items():
        report.files.append(write_csv(table, out / f"{name}.csv"))
        if latex and name != "problems":
            (out / f"{name}.tex").write_text(to_latex(table))
            report.files.append(out / f"{name}.tex")
    report.files.append(write_runs_csv(runs, out / "runs.csv"))
    (out / "report.md").write_text(_markdown(roots, runs, tables, plots))
    report.files += [out / "report.md", *plots]
    return report
