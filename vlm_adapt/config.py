"""Hydra/OmegaConf glue: where the packaged config tree lives, and the resolvers it uses."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

CONFIG_PATH = "pkg://vlm_adapt.conf"


def repo_root() -> Path | None:
    """The source checkout this package runs from, if any (None for a plain installed package)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "conf").is_dir() else None


def default_data_dir() -> str:
    """`../shared/data` beside a checkout (the shipped test images), else `./data`."""
    root = repo_root()
    return str(root.parent / "shared" / "data") if root is not None else str(Path.cwd() / "data")


def slurm_gpus(accelerator: str, devices: int) -> int:
    """GPUs a launcher requests per node: Lightning's devices when it may train on GPUs, else 0."""
    return int(devices) if str(accelerator) in ("gpu", "cuda", "auto") else 0


def path_name(path: str) -> str:
    """The last component of a path (`${vlm_adapt_path_name:${hydra:sweep.dir}}` names a sweep)."""
    return Path(str(path)).name


def wandb_offline() -> bool:
    """Offline unless a wandb key is configured (WANDB_API_KEY or a `wandb login` entry in ~/.netrc)
    or WANDB_MODE asks for online: a run without a key still logs, to files `wandb sync` uploads later."""
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("online", "run"):
        return False
    if mode in ("offline", "dryrun", "disabled"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    has_login = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    return not (os.environ.get("WANDB_API_KEY") or has_login)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("vlm_adapt_data_dir"):
        OmegaConf.register_new_resolver("vlm_adapt_data_dir", default_data_dir)
    if not OmegaConf.has_resolver("vlm_adapt_slurm_gpus"):
        OmegaConf.register_new_resolver("vlm_adapt_slurm_gpus", slurm_gpus)
    if not OmegaConf.has_resolver("vlm_adapt_wandb_offline"):
        OmegaConf.register_new_resolver("vlm_adapt_wandb_offline", wandb_offline)
    if not OmegaConf.has_resolver("vlm_adapt_path_name"):
        OmegaConf.register_new_resolver("vlm_adapt_path_name", path_name)


register_resolvers()
