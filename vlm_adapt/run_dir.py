"""One run per run directory: claimed, locked and checked before anything is written into it.

A run directory holds one run's results (metrics.json, checkpoints, logs, its Hydra config). Before
a command writes there, `claim_run_directory`:
- takes an exclusive lock (`.lock`, an flock held for the life of the process, so a crashed or killed
  run never leaves it stale) and refuses a directory that a live run holds;
- refuses a directory holding a completed run, or an unfinished run of another configuration, unless
  `overwrite=true` (which removes that run's results first); an unfinished run of the same
  configuration is resumed (the same command again, e.g. after a crash or a Slurm requeue);
- then writes the Hydra config files (`.hydra/`), which Hydra itself would have written before these
  checks (the project sets `hydra.output_subdir: null` and saves them here instead).

"The same configuration" is a digest of the resolved config without the keys that do not change what
is computed (`IGNORED_KEYS`: paths, loggers, resume options, loader workers); it is recorded in
metrics.json. Only global rank 0 claims; the other ranks of a multi-process run write nothing here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vlm_adapt.config import config_leaves
from vlm_adapt.errors import (
    ConfigError,
    DivergedError,
    RunDirectoryError,
    debug_errors,
    exit_with_message,
    is_user_error,
    user_message,
)
from vlm_adapt.metrics.record import write_metrics

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# what a run writes into its directory: removed by overwrite=true
RESULT_PATHS = ("metrics.json", "checkpoints", "csv", "wandb", "tensorboard", ".hydra")
IGNORED_KEYS = ("paths", "logger", "resume", "ckpt_path", "overwrite", "loader", "tags")
RANK_ENV = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def process_rank() -> int:
    """This process's global rank, from the variables launchers set (0 when none is set)."""
    for name in RANK_ENV:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return 0


def comparable_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the keys that do not change what a run computes."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in plain.items() if k not in IGNORED_KEYS and k != "hydra"}


def config_digest(cfg: DictConfig) -> str:
    text = json.dumps(comparable_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differing_keys(run_dir: Path, cfg: DictConfig, limit: int = 6) -> str:
    """`key: old -> new` for the settings in which `run_dir`'s saved config differs from `cfg`."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        return "its config is not saved"
    try:
        old = config_leaves(OmegaConf.load(saved))
    except Exception:  # a damaged config file: the digest already says the runs differ
        return "its saved config is unreadable"
    new = config_leaves(cfg)
    keys = sorted((k for k in old.keys() | new.keys()
                   if k.split(".")[0] not in IGNORED_KEYS and old.get(k, "<unset>") != new.get(k, "<unset>")),
                  key=lambda k: (not k.endswith(".name"), k))  # a config group's choice first: method.name
    shown = [f"{k}: {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}" for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "differs in " + "; ".join(shown) + more if keys else "differs in resolved values"


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's metrics.json, {} when it is unreadable, None when there is none."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _lock(run_dir: Path) -> int:
    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirectoryError(
            f"cannot write to the run directory {run_dir} ({err.strerror}). Choose a writable one with "
            "hydra.run.dir=/path (or paths.log_dir=/path, or the VLM_ADAPT_LOG_DIR variable)."
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunDirectoryError(
            f"the run directory {run_dir} is in use by a live run ({holder}). Wait for it to finish, or "
            "choose another directory with hydra.run.dir=/path."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def _check_previous_run(run_dir: Path, cfg: DictConfig, digest: str, overwrite: bool) -> None:
    record = read_record(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    if record is None and not last.is_file():
        return
    if overwrite:
        removed = [name for name in RESULT_PATHS if (run_dir / name).exists()]
        for name in removed:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        log.warning("overwrite=true: removed the previous run's %s from %s", ", ".join(removed), run_dir)
        return
    record = record or {}
    what = f"method={record.get('method', '?')} on {record.get('dataset', '?')}"
    keep = (
        "Pass overwrite=true to replace it, or choose another directory with hydra.run.dir=/path."
    )
    if record.get("status") == "completed":
        raise RunDirectoryError(f"the run directory {run_dir} holds a completed run ({what}); running into it "
                                f"would overwrite its results. {keep}")
    if record.get("config_digest") != digest:
        raise RunDirectoryError(
            f"the run directory {run_dir} holds an unfinished run ({what}, status "
            f"{record.get('status', 'unknown')}) whose config {differing_keys(run_dir, cfg)}. Rerun its own "
            f"command to resume it. {keep}"
        )
    if not cfg.get("resume", False) and last.is_file():
        raise RunDirectoryError(
            f"the run directory {run_dir} holds an unfinished run of this config with a checkpoint, and "
            "resume=false would start it over. Pass resume=true to continue it, or overwrite=true to start over."
        )


def _save_hydra_config(run_dir: Path, cfg: DictConfig) -> None:
    """`.hydra/config.yaml`, `hydra.yaml`, `overrides.yaml`, as Hydra writes them."""
    folder = run_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")
        OmegaConf.save(hydra_cfg.overrides.task, folder / "overrides.yaml")


@contextmanager
def claim_run_directory(cfg: DictConfig, run_dir: str | Path) -> Iterator[str]:
    """Lock and check `run_dir` for this run (rank 0), save its config; yields the config digest."""
    run_dir = Path(run_dir)
    digest = config_digest(cfg)
    if process_rank() != 0:
        yield digest
        return
    fd = _lock(run_dir)
    try:
        _check_previous_run(run_dir, cfg, digest, bool(cfg.get("overwrite", False)))
        _save_hydra_config(run_dir, cfg)
        yield digest
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def check_seed(cfg: DictConfig) -> None:
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} is not an integer; pass e.g. seed=1")


def failure_status(err: BaseException) -> str:
    """The status a run that raised `err` is recorded with."""
    if isinstance(err, DivergedError):
        return "diverged"
    if isinstance(err, (KeyboardInterrupt, SystemExit)):  # Lightning turns Ctrl+C into SystemExit(1)
        return "interrupted"
    return "failed"


def record_failure(run_dir: str | Path, record: dict[str, Any], err: BaseException) -> None:
    """metrics.json of a run that raised `err` (rank 0): its status and the message a user sees."""
    if process_rank() != 0:
        return
    message = user_message(err) if is_user_error(err) else f"{type(err).__name__}: {err}"
    write_metrics(run_dir, record | {"status": failure_status(err), "error": message})


def writable_ancestor_problem(path: Path) -> str | None:
    """Why a directory could not be created at `path` (None if it can): checked without creating it."""
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a directory"
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        return f"{ancestor} is not writable ({err.strerror})"
    return None


class OutputDirCheck(Callback):
    """Hydra callback: refuse an output directory that cannot be created, before Hydra tries to.

    Hydra creates the run (or sweep) directory before the task function starts, so its failure would
    reach the user as a traceback from Hydra's internals. Nothing is created here: `${now:}` in the
    directory name may resolve to another second when Hydra creates it.
    """

    def _check(self, directory: str, key: str) -> None:
        problem = writable_ancestor_problem(Path(directory).expanduser().absolute())
        if problem is None:
            return
        message = (f"cannot create the output directory {directory}: {problem}. Choose a writable one with "
                   f"{key}=/path (or paths.log_dir=/path, or the VLM_ADAPT_LOG_DIR variable).")
        if debug_errors():
            raise RunDirectoryError(message)
        exit_with_message("vlm-adapt", message)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(str(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(str(config.hydra.sweep.dir), "hydra.sweep.dir")
