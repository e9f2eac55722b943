"""Finding run directories under sweep folders and reading what each run was and what it measured.

A run directory is one holding `.hydra/config.yaml` (a Hydra run) or `metrics.json`. Only those
two files are read: the config says what the run was meant to be (also for a run that died before
writing metrics), metrics.json what it measured and whether it completed.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlm_adapt.config import config_leaves
from vlm_adapt.errors import ConfigError

COMPLETED = "completed"
MISSING = "missing"  # a Hydra run directory without metrics.json: killed, still running, or never started
UNSET = "<unset>"  # a key one run's config has and another's lacks

# Config keys that say where or how verbosely a run ran, not what it computed: two runs differing
# only in these (and the seed) are repeats of one experiment.
IGNORED_KEYS = ("seed", "task_name", "tags", "ckpt_path", "resume", "optimized_metric")
IGNORED_PREFIXES = ("paths.", "hydra.", "logger.", "callbacks.", "loader.", "protocol.targets.")
IGNORED_TRAINER_KEYS = (
    "trainer.accelerator", "trainer.enable_progress_bar", "trainer.default_root_dir",
    "trainer.log_every_n_steps", "trainer.enable_model_summary",
)


@dataclass
class Run:
    """One run directory: identity, status, metrics and cost, as recorded."""

    path: Path
    status: str
    method: str
    dataset: str
    protocol: str
    shots: int | None
    seed: int | None
    backbone: str
    pretrained: str | None
    random_init: bool
    targets: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    settings: dict[str, str] = field(default_factory=dict)  # what the run computed: see experiment_settings
    variant: str = ""  # the settings that tell this run apart from other runs of its method (label_variants)
    variant_tag: str = ""  # `variant`, or "variant <i>" when too long for a table cell

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED

    @property
    def label(self) -> str:
        """Method name plus the settings that distinguish it from other runs of the same method."""
        return f"{self.method} [{self.variant_tag}]" if self.variant_tag else self.method

    @property
    def backbone_label(self) -> str:
        """The model and its weights; random-init backbones are always named as such."""
        return f"{self.backbone} ({'random-init' if self.random_init else self.pretrained})"


def _load_config(run_dir: Path) -> DictConfig | None:
    path = run_dir / ".hydra" / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def _get(config: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def read_run(run_dir: Path) -> Run:
    """A Run from `run_dir/metrics.json` and `run_dir/.hydra/config.yaml` (either may be absent)."""
    loaded = _load_config(run_dir)
    config = OmegaConf.to_container(loaded, resolve=False) if loaded is not None else {}
    metrics_path = run_dir / "metrics.json"
    record: dict[str, Any] = {}
    if metrics_path.is_file():
        try:
            record = json.loads(metrics_path.read_text())
        except json.JSONDecodeError as err:
            record = {"status": "unreadable", "error": f"metrics.json is not valid JSON: {err}"}
    pretrained = record.get("pretrained", _get(config, "backbone.pretrained"))
    targets = record.get("targets") or list(_get(config, "protocol.targets") or {})
    return Run(
        path=run_dir,
        status=record.get("status", MISSING) if record else MISSING,
        method=str(record.get("method") or _get(config, "method.name", "?")),
        dataset=str(record.get("dataset") or _get(config, "data.name", "?")),
        protocol=str(record.get("protocol") or _get(config, "protocol.name", "?")),
        shots=record.get("shots", _get(config, "protocol.shots")),
        seed=record.get("seed", _get(config, "seed")),
        backbone=str(record.get("backbone") or _get(config, "backbone.model_name", "?")),
        pretrained=pretrained,
        random_init=bool(record.get("random_init", pretrained is None)),
        targets=list(targets),
        metrics=dict(record.get("metrics") or {}),
        cost=dict(record.get("cost") or {}),
        error=record.get("error"),
        settings=experiment_settings(loaded, list(targets)) if loaded is not None else {},
    )


def find_run_dirs(roots: list[Path]) -> list[Path]:
    """Every directory under `roots` (or a root itself) holding `.hydra/config.yaml` or `metrics.json`."""
    found: set[Path] = set()
    for root in roots:
        if not root.is_dir():
            raise ConfigError(f"{root} is not a directory: pass sweep or run folders (outputs/<task>/multiruns/...)")
        found.update(p.parent.parent for p in root.rglob(".hydra/config.yaml"))
        found.update(p.parent for p in root.rglob("metrics.json"))
    return sorted(found, key=lambda p: (str(p.parent), _numeric_name(p)))


def _numeric_name(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


def _ignored(key: str) -> bool:
    return (
        key in IGNORED_KEYS or key in IGNORED_TRAINER_KEYS or key.endswith(".root")
        or any(key.startswith(prefix) or key == prefix[:-1] for prefix in IGNORED_PREFIXES)
    )


def experiment_settings(config: DictConfig, targets: list[str]) -> dict[str, str]:
    """The config values that decide what a run computes (not where it ran or how it logged)."""
    settings = {key: value for key, value in config_leaves(config).items() if not _ignored(key)}
    if targets:
        settings["protocol.targets"] = ",".join(targets)
    return settings


MAX_INLINE_VARIANT = 48  # longer variant descriptions go to the report's variant legend


def label_variants(runs: list[Run]) -> None:
    """Name each run's variant by the config keys that differ between runs of one experiment cell.

    A cell is (protocol, dataset, shots, method, backbone, weights): runs in it should differ only by
    seed. A key that differs inside any cell (e.g. a LoRA rank swept alongside the seeds) becomes part
    of the label of every run of that method, so different settings are never averaged together.
    Keys that only change with the dataset or shot count (per-dataset epochs) do not split rows.
    """
    cells: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        if run.settings:  # a bare metrics.json says nothing about settings
            cells[(run.protocol, run.dataset, run.shots, run.method, run.backbone, run.pretrained)].append(run)
    varying: dict[tuple, set[str]] = defaultdict(set)
    for (protocol, _, _, method, backbone, pretrained), members in cells.items():
        for key in set().union(*(run.settings for run in members)):
            if len({run.settings.get(key, UNSET) for run in members}) > 1:
                varying[(protocol, method, backbone, pretrained)].add(key)
    for run in runs:
        keys = sorted(varying.get((run.protocol, run.method, run.backbone, run.pretrained), ()))
        run.variant = ", ".join(f"{key.removeprefix('method.')}={run.settings.get(key, UNSET)}" for key in keys)
    by_method: dict[str, set[str]] = defaultdict(set)
    for run in runs:
        by_method[run.method].add(run.variant)
    tags = {}
    for method, texts in by_method.items():
        long_texts = sorted(text for text in texts if len(text) > MAX_INLINE_VARIANT)
        tags.update({(method, text): text for text in texts if len(text) <= MAX_INLINE_VARIANT})
        tags.update({(method, text): f"variant {i + 1}" for i, text in enumerate(long_texts)})
    for run in runs:
        run.variant_tag = tags[(run.method, run.variant)] if run.variant else ""


def variant_legend(runs: list[Run]) -> list[str]:
    """`method [variant i]: settings` for every variant whose settings did not fit in its label."""
    return sorted({f"{run.label}: {run.variant}" for run in runs if run.variant and run.variant_tag != run.variant})


def load_runs(roots: list[str | Path]) -> list[Run]:
    """Every run under `roots`, variants labelled; raises when there is none."""
    paths = [Path(root).expanduser() for root in roots]
    runs = [read_run(run_dir) for run_dir in find_run_dirs(paths)]
    if not runs:
        raise ConfigError(
            f"No run directories (with .hydra/config.yaml or metrics.json) under {', '.join(map(str, paths))}."
        )
    label_variants(runs)
    return runs
