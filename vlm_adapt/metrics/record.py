"""metrics.json: the one file per run that reports and sweeps read.

Accuracies and recalls are stored in percent under stable names: `test/<label space>/acc`
(`<dataset>` for the whole test set, `base` and `new` for base-to-new, each target dataset's name
for cross-dataset runs), `test/hm` for base-to-new, `val/acc`; the cost figures under `cost`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

PERCENT_SUFFIXES = ("/acc", "/r1", "/r5", "/r10", "/rsum_mean")


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def task_metrics(callback_metrics: dict[str, Any]) -> dict[str, float]:
    """Test and validation figures from Lightning's logged metrics, in percent; HM when base and new exist."""
    metrics: dict[str, float] = {}
    for key, value in callback_metrics.items():
        if not key.startswith(("test/", "val/")):
            continue
        value = float(value)
        if math.isnan(value):
            continue
        metrics[key] = round(100 * value, 4) if key.endswith(PERCENT_SUFFIXES) else value
    if "test/base/acc" in metrics and "test/new/acc" in metrics:
        metrics["test/hm"] = round(harmonic_mean(metrics["test/base/acc"], metrics["test/new/acc"]), 4)
    return dict(sorted(metrics.items()))


def run_identity(cfg: DictConfig, method: str, backbone: dict[str, Any]) -> dict[str, Any]:
    """What a run was: the fields reports group and filter by."""
    random_init = backbone.get("pretrained") is None
    return {
        "task_name": cfg.task_name,
        "method": method,
        "dataset": cfg.data.name,
        "protocol": cfg.protocol.name,
        "shots": cfg.protocol.get("shots"),
        "targets": list(cfg.protocol.get("targets") or {}),  # cross-dataset / domain-generalization test sets
        "seed": cfg.seed,
        "backbone": backbone.get("model_name"),
        "pretrained": backbone.get("pretrained"),
        "random_init": random_init,
        "quick_gelu": backbone.get("quick_gelu"),
        "precision": str((cfg.get("trainer") or {}).get("precision", "32-true")),
        "tags": list(cfg.get("tags") or []) + (["random-init"] if random_init else []),
    }


def write_metrics(output_dir: str | Path, record: dict[str, Any]) -> Path:
    path = Path(output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
