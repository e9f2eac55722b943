"""Writing a Table as Markdown, CSV (mean, std and n in separate columns) or LaTeX (booktabs)."""

from __future__ import annotations

import csv
from pathlib import Path

from vlm_adapt.report.stats import Stat
from vlm_adapt.report.tables import Cell, Table

DEFAULT_FORMAT = "{:.2f}"


def _max_n(table: Table) -> int:
    return max((cell.n for row in table.rows for cell in row if isinstance(cell, Stat)), default=0)


def format_cell(cell: Cell, fmt: str, max_n: int, plus_minus: str = " ± ", zero_std: bool = True) -> str:
    """Text of a cell; a Stat shows mean ± std, and its run count when below the table's usual count."""
    if cell is None:
        return "-"
    if isinstance(cell, Stat):
        if cell.n == 0:
            return "-"
        text = fmt.format(cell.mean)
        if cell.n > 1 and (zero_std or cell.std > 0):
            text += plus_minus + fmt.format(cell.std)
        if cell.n < max_n:
            text += f" (n={cell.n})"
        return text
    if isinstance(cell, float):
        return fmt.format(cell)
    return str(cell)


def to_markdown(table: Table) -> str:
    max_n = _max_n(table)
    lines = [f"### {table.title}", "", "| " + " | ".join(table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    for row in table.rows:
        cells = [format_cell(c, table.formats.get(col, DEFAULT_FORMAT), max_n, zero_std=table.show_zero_std)
                 for col, c in zip(table.columns, row)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += [""] + [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


def _stat_columns(table: Table) -> set[int]:
    return {i for row in table.rows for i, cell in enumerate(row) if isinstance(cell, Stat)}


def write_csv(table: Table, path: Path) -> Path:
    """One column per plain cell; `<column> mean`, `<column> std`, `<column> n` for every Stat column."""
    stats = _stat_columns(table)
    header: list[str] = []
    for i, column in enumerate(table.columns):
        header += [f"{column} mean", f"{column} std", f"{column} n"] if i in stats else [column]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in table.rows:
            out: list[object] = []
            for i, cell in enumerate(row):
                if i in stats:
                    has = isinstance(cell, Stat) and cell.n > 0
                    out += [repr(cell.mean), repr(cell.std), cell.n] if has else ["", "", 0]
                else:
                    out.append("" if cell is None else cell)
            writer.writerow(out)
    return path


LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); Stats as $mean \\pm std$."""
    max_n = _max_n(table)
    spec = "".join("r" if i in _stat_columns(table) else "l" for i in range(len(table.columns)))
    lines = [f"% {latex_escape(table.title)}", f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
             " & ".join(latex_escape(c) for c in table.columns) + r" \\", "\\midrule"]
    for row in table.rows:
        cells = []
        for column, cell in zip(table.columns, row):
            fmt = table.formats.get(column, DEFAULT_FORMAT)
            if isinstance(cell, Stat) and cell.n:
                text = format_cell(cell, fmt, max_n, plus_minus=r" \pm ", zero_std=table.show_zero_std)
                cells.append("$" + text.replace(",", "{,}") + "$")
            else:
                cells.append(latex_escape(format_cell(cell, fmt, max_n)))
        lines.append(" & ".join(cells) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"
