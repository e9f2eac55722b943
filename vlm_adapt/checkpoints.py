"""Reading vlm_adapt checkpoints safely, for every command that takes a `ckpt_path`.

A checkpoint holds only plain types and tensors, so it is always read with `weights_only=True`: a file
crafted to run code when unpickled is refused with a clear message instead of being executed.
Checkpoints are written to a temporary file beside the target and renamed over it, so a crash during a
save leaves the previous good checkpoint in place.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vlm_adapt.errors import ConfigError

CHECKPOINT_KEY = "vlm_adapt"


def read_checkpoint(path: str | Path, key: str = "ckpt_path", hint: str = "") -> dict[str, Any]:
    """The checkpoint at `path`, loaded with weights_only=True; errors name `key` and what to pass instead
    (`hint`: what else the user can do, for an unreadable file)."""
    path = Path(path)
    if not path.is_file():
        what = "a directory" if path.is_dir() else "missing"
        raise ConfigError(f"{key}={path} is {what}; pass a run's checkpoints/last.ckpt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's own message suggests weights_only=False: not repeated here
        raise ConfigError(
            f"{key}={path} was not loaded: it is corrupt, or it holds objects other than tensors and plain values, "
            "which could run code when loaded. vlm_adapt checkpoints hold neither; pass a run's "
            "checkpoints/last.ckpt written by vlm-adapt train" + (f"; {hint}" if hint else ".")
        ) from err
    except Exception as err:  # a truncated or random file fails anywhere inside the unpickler
        raise ConfigError(
            f"{key}={path} is not a readable checkpoint ({type(err).__name__}: {err}); it may be truncated. "
            "Pass a run's checkpoints/last.ckpt" + (f"; {hint}" if hint else ".")
        ) from err
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise ConfigError(f"{key}={path} was not written by vlm_adapt (no '{CHECKPOINT_KEY}' entry)")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, writing `<path>.tmp` beside the target, then renaming it over.

    Lightning's own writer goes through fsspec, whose local "transaction" stages the file in the system
    temporary directory and copies it over the target when that is another filesystem: a crash in the
    copy truncates the previous checkpoint. A rename within one directory is atomic.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own (object stores write whole objects)
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("storage_options is not supported for local checkpoints")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(target)
