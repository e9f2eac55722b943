"""`vlm-adapt bench`: the training cost of every method on one backbone, batch size and class count.

Each method trains for `bench.epochs` epochs of `bench.steps` steps through `vlm_adapt.train.train`
(the code behind `vlm-adapt train`: its datamodule, method, Lightning Trainer and `CostMonitor`) in
a process of its own, because a process's peak memory only grows. Methods are interleaved and the
whole round repeated `bench.repeats` times (the order rotates each round); the table reports medians
over the repeats, so one run's ratios are comparable even on a noisy machine.

The training images are real (`bench.class_source`, ImageNet samples by default); the label space is
the first `bench.num_classes` ImageNet class names, since text-side backpropagation grows with the
class count. Labels need not match the images: only cost is measured. An epoch is exactly
`bench.steps` batches. Time per step comes from the last epoch (the first holds the warm-up and any
lazily filled cache); per-epoch work outside the steps (Skip Tuning's LSkip cache, the linear
probe's fit) has its own column and is amortised over the epoch's steps in another; how much longer
the first epoch took (UniPT's hidden-state cache, warm-up) is a third.

Outputs in the run directory: bench.md (the printed table), bench.json (settings, every run, the
table), bench.csv (the table) and jobs/<repeat>_<method>/ (each process's config, log and metrics).
"""

from __future__ import annotations

import csv
import importlib.resources
import json
import logging
import multiprocessing
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import hydra
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from vlm_adapt import config as _config
from vlm_adapt.bench_worker import TIMING_FILE, run_job
from vlm_adapt.build import method_class
from vlm_adapt.data.splits import IMAGE_SUFFIXES, read_classnames_file
from vlm_adapt.errors import ConfigError, DatasetNotFoundError, exit_on_user_error
from vlm_adapt.methods.registry import registered_methods

log = logging.getLogger(__name__)

TEMPLATE = "a photo of a {}."
# figures whose median over the repeats the table reports, and the ones it also gives as a ratio
MEDIAN_FIGURES = ("peak_memory_mb", "train_memory_mb", "time_per_step_s", "epoch_extra_s", "step_with_extra_s",
                  "first_epoch_extra_s", "startup_s", "cpu_time_per_step_s")
RATIOS = {
    "trainable_params": "params_ratio",
    "peak_memory_mb": "peak_memory_ratio",
    "train_memory_mb": "train_memory_ratio",
    "time_per_step_s": "time_ratio",
    "step_with_extra_s": "time_with_extra_ratio",
    "cpu_time_per_step_s": "cpu_time_ratio",
}


# ---------------------------------------------------------------- configuration
def available_methods() -> list[str]:
    folder = importlib.resources.files("vlm_adapt.conf") / "method"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def compose_train_config(overrides: list[str]) -> DictConfig:
    """The `train` config as `vlm-adapt train overrides...` composes it (inside or outside a Hydra app)."""
    if GlobalHydra.instance().is_initialized():
        return hydra.compose(config_name="train", overrides=overrides)
    with initialize_config_module(config_module="vlm_adapt.conf", version_base="1.3"):
        return hydra.compose(config_name="train", overrides=overrides)


def benched_methods(methods: list[str] | None) -> list[str]:
    """`bench.methods`, or (null) every registered method that trains and has a config of its name."""
    if methods is not None:
        return list(methods)
    configs = set(available_methods())
    return [name for name, spec in registered_methods().items() if spec.trains and name in configs]


def check_methods(methods: list[str], baseline: str) -> None:
    """Every method must have a config and train; the baseline (for the ratios) must be benched too."""
    if not methods:
        raise ConfigError("bench.methods is empty; list method config names, e.g. [ft, coop, clipfit].")
    known = available_methods()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"bench.methods has no config for {unknown}; pick from {known} (conf/method/*.yaml).")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"bench.methods lists a method twice: {methods}")
    if baseline not in methods:
        raise ConfigError(f"bench.baseline={baseline!r} is not in bench.methods {methods}; the ratios need it.")
    for method in methods:
        if not method_class(compose_train_config([f"method={method}"]).method.module._target_).spec.trains:
            raise ConfigError(f"method {method!r} does not train, so it has no training cost: leave it out of "
                              "bench.methods.")


def write_bench_split(path: Path, class_source: Path, num_classes: int, batch_size: int, steps: int) -> Path:
    """A CoOp-layout split file over `class_source` (an image folder with classnames.txt).

    Labels 0..num_classes-1 take the first class names. The train split holds `steps` batches of
    distinct images, batch b labelled b % num_classes (so a sampler that wants whole batches of one
    class still gets full batches); the test split holds one image of each class (never run).
    """
    entries = read_classnames_file(class_source / "classnames.txt")
    if not 1 <= num_classes <= len(entries):
        raise ConfigError(f"bench.num_classes={num_classes}: {class_source} has {len(entries)} classes; "
                          f"use 1..{len(entries)} or point bench.class_source at a larger image folder.")
    images = []
    for folder, _ in entries:
        files = sorted(p for p in (class_source / "images" / folder).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetNotFoundError(f"bench.class_source: no images in {class_source / 'images' / folder}.")
        images.append(f"images/{folder}/{files[0].name}")
    names = [name for _, name in entries]

    def item(image_index: int, label: int) -> list[Any]:
        return [images[image_index % len(images)], label, names[label]]

    train = [item(i, (i // batch_size) % num_classes) for i in range(steps * batch_size)]
    test = [item(label, label) for label in range(num_classes)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"train": train, "val": [], "test": test}))
    return path


def job_config(cfg: DictConfig, method: str, job_dir: Path, split_file: Path, accelerator: str) -> DictConfig:
    """The `vlm-adapt train` config of one bench process, fully resolved."""
    bench = cfg.bench
    overrides = [f"method={method}", *(bench.get("method_overrides") or {}).get(method, [])]
    job = compose_train_config(overrides)
    settings = {
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        "data": {
            "name": "bench", "layout": "coop", "root": str(Path(bench.class_source)), "split_file": str(split_file),
            "image_dir": ".", "templates": [TEMPLATE], "augment": "coop",
            "train_all_classes": False,  # `steps` single-class batches may cover fewer than num_classes classes
        },
        "protocol": {"name": "bench", "shots": None, "train_subset": "all", "test_subsets": ["all"]},
        "seed": cfg.seed,
        "task_name": "bench",
        "resume": False,
        "ckpt_path": None,
        "paths.output_dir": str(job_dir),
        "method.batch_size": bench.batch_size,
        "method.max_epochs": bench.epochs,
        "method.max_steps": -1,  # a step-counted method (CLIP-LoRA) runs the bench's epochs too
        "loader.num_workers": 0,
        "logger": {},
        "callbacks": {"epoch_timer": {
            "_target_": "vlm_adapt.bench_worker.EpochTimer", "output_file": str(job_dir / TIMING_FILE),
        }},
        "trainer.accelerator": accelerator,
        "trainer.devices": 1,
        "trainer.strategy": "auto",
        "trainer.precision": bench.precision,
        "trainer.max_epochs": bench.epochs,
        "trainer.max_steps": -1,
        "trainer.limit_train_batches": bench.steps,
        "trainer.limit_val_batches": 0,
        "trainer.limit_test_batches": 0,
        "trainer.enable_checkpointing": False,  # a checkpoint write would land in the epoch-end time
        "trainer.enable_progress_bar": False,
        "trainer.log_every_n_steps": 1,
    }
    with open_dict(job):
        for key, value in settings.items():
            OmegaConf.update(job, key, value, merge=False, force_add=True)
    OmegaConf.resolve(job)
    return job


# ---------------------------------------------------------------- running
def resolve_accelerator(accelerator: str) -> str:
    if accelerator != "auto":
        return accelerator
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def process_context(accelerator: str) -> multiprocessing.context.BaseContext:
    """Fresh processes for every job. On CPU they fork from a server that has already imported torch
    and Lightning (seconds saved per job); CUDA is not fork-safe, so GPU jobs start from scratch."""
    if accelerator == "cpu":
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["vlm_adapt.bench_worker"])
        return context
    return multiprocessing.get_context("spawn")


def run_process(context: multiprocessing.context.BaseContext, job: DictConfig, job_dir: Path,
                timeout_s: float, num_threads: int | None) -> str:
    """Run one job in its own process; returns "completed", "failed" or "timeout"."""
    job_dir.mkdir(parents=True, exist_ok=True)
    config_file = job_dir / "config.yaml"
    OmegaConf.save(job, config_file)
    process = context.Process(target=run_job, args=(str(config_file), str(job_dir / "job.log"), num_threads))
    process.start()
    process.join(timeout_s)
    if process.is_alive():
        process.kill()
        process.join()
        return "timeout"
    return "completed" if process.exitcode == 0 and (job_dir / "metrics.json").is_file() else "failed"


def read_run(job_dir: Path, method: str, repeat: int, status: str) -> dict[str, Any]:
    """One process's figures: memory and parameters from CostMonitor (metrics.json), times from the
    epoch timer (timing.json): s/step and per-epoch extra from the last epoch."""
    run: dict[str, Any] = {"method": method, "repeat": repeat, "status": status, "job_dir": str(job_dir)}
    if status != "completed":
        log_file = job_dir / "job.log"
        run["error"] = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:]) if log_file.is_file() else ""
        return run
    cost = json.loads((job_dir / "metrics.json").read_text())["cost"]
    timing = json.loads((job_dir / TIMING_FILE).read_text())
    first, last = timing["epochs"][0], timing["epochs"][-1]
    time_per_step = statistics.mean(last["step_s"])
    extra = last["start_s"] + last["end_s"]
    batches = timing.get("batches_per_epoch") or len(last["step_s"])
    run.update(
        device=cost["device"],
        trainable_params=cost["trainable_params"],
        total_params=cost["total_params"],
        peak_memory_mb=cost["peak_memory_mb"],
        train_memory_mb=cost["train_memory_mb"],
        time_per_step_s=time_per_step,
        cpu_time_per_step_s=statistics.mean(last["step_cpu_s"]),
        epoch_extra_s=extra,
        batches_per_epoch=batches,
        step_with_extra_s=time_per_step + extra / batches,
        first_epoch_extra_s=first["wall_s"] - last["wall_s"],
        startup_s=timing["startup_s"],
        epochs=timing["epochs"],
    )
    return run


# ---------------------------------------------------------------- aggregation and tables
def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def aggregate(runs: list[dict[str, Any]], methods: list[str], baseline: str) -> list[dict[str, Any]]:
    """One row per method: the median of each figure over its completed repeats, and ratios to `baseline`."""
    rows = []
    for method in methods:
        done = [run for run in runs if run["method"] == method and run["status"] == "completed"]
        row: dict[str, Any] = {"method": method, "repeats": len(done),
                               "trainable_params": done[0]["trainable_params"] if done else None}
        for figure in MEDIAN_FIGURES:
            values = [run[figure] for run in done if run.get(figure) is not None]
            row[figure] = statistics.median(values) if values else None
        rows.append(row)
    reference = next(row for row in rows if row["method"] == baseline)
    for row in rows:
        for figure, name in RATIOS.items():
            row[name] = ratio(row[figure], reference[figure])
    return rows


def _fmt(value: Any, digits: int | str) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.3g}" if digits == "g" else f"{value:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]], baseline: str) -> str:
    x = f"x {baseline}"
    columns = [
        ("method", "method", 0), ("trainable params", "trainable_params", 0), (x, "params_ratio", "g"),
        ("peak MB", "peak_memory_mb", 0), ("train MB", "train_memory_mb", 0), (x, "train_memory_ratio", 2),
        ("s/step", "time_per_step_s", 3), (x, "time_ratio", 2),
        ("CPU s/step", "cpu_time_per_step_s", 2), (x, "cpu_time_ratio", 2),
        ("epoch extra s", "epoch_extra_s", 2), ("s/step with extra", "step_with_extra_s", 3),
        (x, "time_with_extra_ratio", 2), ("first-epoch extra s", "first_epoch_extra_s", 1),
        ("startup s", "startup_s", 1), ("repeats", "repeats", 0),
    ]
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
             "|" + "|".join("---" if key == "method" else "---:" for _, key, _ in columns) + "|"]
    for row in rows:
        cells = [row[key] if key == "method" else _fmt(row[key], digits) for _, key, digits in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(settings: dict[str, Any]) -> str:
    return (
        f"Training cost of {settings['backbone']} (pretrained: {settings['pretrained']}) on {settings['device']}: "
        f"{settings['num_classes']} classes, batch {settings['batch_size']}, {settings['epochs']} epochs of "
        f"{settings['steps']} steps per process, median of {settings['repeats']} interleaved repeats "
        "(each method in a fresh process).\n"
        "train MB: peak memory above the loaded model (CUDA allocator peak on GPU, peak RSS on CPU, which "
        "includes caches held in host memory). s/step: mean step of the last epoch. epoch extra s: the last "
        "epoch's work outside the steps (caches built at epoch start, fits at epoch end, the first batch load); "
        "s/step with extra: s/step plus that work spread over the epoch's steps. CPU s/step: the process's CPU "
        "time per step (all threads; with bench.num_threads=1 the figure other processes disturb least). "
        "first-epoch extra s: how much longer the first epoch took than the last (lazily filled caches, "
        "warm-up). startup s: one-off work before the first epoch. Machine load average (1 min) at the start "
        f"and end: {settings['load_average'][0]:.1f}, {settings['load_average'][1]:.1f}."
    )


def write_outputs(run_dir: Path, settings: dict[str, Any], runs: list[dict[str, Any]],
                  rows: list[dict[str, Any]]) -> str:
    table = markdown_table(rows, settings["baseline"])
    (run_dir / "bench.md").write_text(f"{describe(settings)}\n\n{table}\n")
    (run_dir / "bench.json").write_text(json.dumps({"settings": settings, "table": rows, "runs": runs}, indent=2))
    with open(run_dir / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return table


def run_bench(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run every (repeat, method) job, write bench.md/json/csv, print the table; returns its rows."""
    bench = cfg.bench
    methods, baseline = benched_methods(bench.methods), bench.baseline
    check_methods(methods, baseline)
    if bench.steps < 1 or bench.epochs < 2 or bench.repeats < 1:
        raise ConfigError("bench.steps and bench.repeats must be >= 1 and bench.epochs >= 2 (the first epoch "
                          "holds the warm-up and lazily filled caches; steps are timed in the last).")
    run_dir = Path(cfg.paths.output_dir)
    split_file = write_bench_split(run_dir / "bench_split.json", Path(bench.class_source), bench.num_classes,
                                   bench.batch_size, bench.steps)
    accelerator = resolve_accelerator(bench.accelerator)
    context = process_context(accelerator)
    load_at_start = os.getloadavg()[0]  # other work on the machine: the reader's measure of the noise
    runs = []
    total = bench.repeats * len(methods)
    for repeat in range(bench.repeats):
        shift = repeat % len(methods)
        for method in methods[shift:] + methods[:shift]:
            job_dir = run_dir / "jobs" / f"{repeat + 1}_{method}"
            job = job_config(cfg, method, job_dir, split_file, accelerator)
            status = run_process(context, job, job_dir, bench.timeout_s, bench.num_threads)
            run = read_run(job_dir, method, repeat + 1, status)
            shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)  # fine-tuned weights: hundreds of MB
            runs.append(run)
            summary = (f"{run['time_per_step_s']:.3f} s/step, {run['train_memory_mb']:.0f} MB"
                       if status == "completed" else f"{status}, see {job_dir / 'job.log'}")
            print(f"[{len(runs)}/{total}] {method} (repeat {repeat + 1}): {summary}", flush=True)
    rows = aggregate(runs, methods, baseline)
    device = next((run["device"] for run in runs if run.get("device")), accelerator)
    settings = {
        "backbone": cfg.backbone.model_name, "pretrained": cfg.backbone.pretrained, "device": device,
        "accelerator": accelerator, "precision": bench.precision, "num_classes": bench.num_classes,
        "batch_size": bench.batch_size, "epochs": bench.epochs, "steps": bench.steps, "repeats": bench.repeats,
        "baseline": baseline,
        "methods": methods, "num_threads": bench.num_threads, "load_average": [load_at_start, os.getloadavg()[0]],
    }
    table = write_outputs(run_dir, settings, runs, rows)
    print(f"\n{describe(settings)}\n\n{table}\n\nsaved: {run_dir / 'bench.md'} (.json, .csv)", flush=True)
    failed = [run for run in runs if run["status"] != "completed"]
    if failed:
        raise RuntimeError("bench jobs did not complete: " + "; ".join(
            f"{run['method']} repeat {run['repeat']} ({run['status']}, log: {run['job_dir']}/job.log)" for run in failed
        ))
    return rows


@hydra.main(version_base="1.3", config_path=_config.CONFIG_PATH, config_name="bench")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error("bench"):
        run_bench(cfg)
