"""Reading vlm_adapt checkpoints safely, for every command that takes a `ckpt_path`.

A checkpoint holds only plain types and tensors, so it is always read with `weights_only=True`: a file
crafted to run code when unpickled is refused with a clear message instead of being executed.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from vlm_adapt.errors import ConfigError

CHECKPOINT_KEY = "vlm_adapt"


def read_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint at `path`, loaded with weights_only=True; errors name `key` and what to pass instead."""
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
            "checkpoints/last.ckpt written by vlm-adapt train."
        ) from err
    except Exception as err:  # a truncated or random file fails anywhere inside the unpickler
        raise ConfigError(
            f"{key}={path} is not a readable checkpoint ({type(err).__name__}: {err}); it may be truncated. "
            "Pass a run's checkpoints/last.ckpt."
        ) from err
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise ConfigError(f"{key}={path} was not written by vlm_adapt (no '{CHECKPOINT_KEY}' entry)")
    return checkpoint
