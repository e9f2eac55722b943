"""`vlm-adapt report DIR [DIR ...] [--out OUT] [--latex]`: paper tables and plots from sweep directories.

Reads only each run's metrics.json and .hydra/config.yaml. Runs that are missing or failed are
listed in the report (and here) and never averaged into a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm_adapt.errors import VlmAdaptError
from vlm_adapt.report.write import write_report


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vlm-adapt report",
        description="Tables (Markdown, CSV, optional LaTeX) and PNG plots from the metrics.json files of runs "
                    "and multirun sweeps: base-to-new, few-shot, cross-dataset / domain generalization, cost.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run directories, searched recursively")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: DIR/report for one directory, ./report for several)")
    parser.add_argument("--latex", action="store_true", help="also write each table as a booktabs .tex file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out or (args.dirs[0] / "report" if len(args.dirs) == 1 else Path("report"))
    try:
        report = write_report(args.dirs, out, latex=args.latex)
    except VlmAdaptError as err:
        print(f"vlm-adapt report: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    completed = sum(run.completed for run in report.runs)
    print(f"{len(report.runs)} runs ({completed} completed) -> {report.out_dir / 'report.md'}")
    for name, table in report.tables.items():
        if name != "problems":
            print(f"  {table.title}: {len(table.rows)} rows -> {report.out_dir / name}.csv")
    for row in report.problems.rows:
        print(f"  left out: {row[0]} ({row[1]}: {row[-1]})")
