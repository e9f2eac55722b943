"""PNG plots (matplotlib's Agg canvas, no display): accuracy vs shots, vs trainable parameters, vs memory."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from vlm_adapt.report.tables import FewShotCurves, Point

MARKERS = "osD^v<>pP*Xh"


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _random_init_note(labels: list[str]) -> str:
    return "\n(random-init backbone: plumbing, not CLIP accuracy)" if any("random-init" in s for s in labels) else ""


def plot_accuracy_vs_shots(curves: FewShotCurves, path: Path) -> Path | None:
    """One panel per dataset (the average first), one line per method variant, error bars = std over seeds."""
    panels = sorted({d for curve in curves.values() for d in curve}, key=lambda d: (not d.startswith("average"), d))
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        for i, ((label, backbone), curve) in enumerate(sorted(curves.items())):
            by_shots = curve.get(panel)
            if not by_shots:
                continue
            shots = sorted(by_shots)
            ax.errorbar(shots, [by_shots[k].mean for k in shots], yerr=[by_shots[k].std for k in shots],
                        marker=MARKERS[i % len(MARKERS)], capsize=3, label=f"{label} / {backbone}")
        all_shots = sorted({k for curve in curves.values() for k in curve.get(panel, {})})
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_shots, [str(k) for k in all_shots])
        ax.set_title(panel)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, max(1, len(labels))), fontsize=8)
    fig.suptitle("Accuracy vs shots" + _random_init_note(labels), fontsize=10)
    return _save(fig, path)


def plot_accuracy_vs_cost(points: list[Point], cost: str, path: Path) -> Path | None:
    """Headline accuracy of each method variant against `trainable_params` or `peak_memory_mb`.

    One marker shape per setting (protocol and shots), one colour per method; zero trainable
    parameters (zero-shot) stay on a symmetric-log axis.
    """
    usable = [p for p in points if getattr(p, cost) is not None]
    if not usable:
        return None
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    settings = sorted({p.setting for p in usable})
    methods = sorted({p.label for p in usable})
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    handles: list[Line2D] = []
    by_setting: dict[str, list[Point]] = defaultdict(list)
    for p in usable:
        by_setting[p.setting].append(p)
    for i, setting in enumerate(settings):
        members = sorted(by_setting[setting], key=lambda p: getattr(p, cost))
        xs, ys = [getattr(p, cost) for p in members], [p.accuracy for p in members]
        ax.scatter(xs, ys, marker=MARKERS[i % len(MARKERS)], c=[colors[p.label] for p in members], s=50,
                   edgecolors="black", linewidths=0.5)
        handles.append(Line2D([], [], marker=MARKERS[i % len(MARKERS)], color="gray", linestyle="", label=setting))
        for p, x, y in zip(members, xs, ys):
            ax.annotate(f"{p.label} / {p.backbone}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if cost == "trainable_params":
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("trainable parameters")
        title = "Accuracy vs trainable parameters"
    else:
        ax.set_xlabel("peak memory (MB)")
        title = "Accuracy vs peak memory"
    ax.set_ylabel("accuracy (%), mean over datasets and seeds")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, title="setting (figure); colour = method", title_fontsize=8)
    ax.set_title(title + _random_init_note([p.backbone for p in usable]), fontsize=10)
    return _save(fig, path)
