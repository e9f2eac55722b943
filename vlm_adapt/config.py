"""Hydra/OmegaConf glue: where the packaged config tree lives, the resolvers it uses, a config's dotted leaves."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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


def multiply(*factors: int) -> int:
    """The product of integers (`${vlm_adapt_mul:${method.iterations_per_shot},${protocol.shots}}`)."""
    if any(factor is None for factor in factors):
        raise ValueError(f"a step count is a product of numbers, got {list(factors)} (protocol.shots=null trains on "
                         "every image, so iterations x shots has no value)")
    return math.prod(int(factor) for factor in factors)


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


def config_leaves(node: DictConfig, prefix: str = "") -> dict[str, str]:
    """Dotted key -> value text, interpolations resolved where they can be outside Hydra, else verbatim."""
    flat: dict[str, str] = {}
    for key in node:
        dotted = f"{prefix}{key}"
        try:
            value = node[key]
        except OmegaConfBaseException:  # e.g. ${hydra:...}: only resolvable inside the run
            value = node._get_node(key)._value()
        if isinstance(value, DictConfig) and len(value):
            flat.update(config_leaves(value, f"{dotted}."))
        elif isinstance(value, (DictConfig, ListConfig)):
            flat[dotted] = json.dumps(OmegaConf.to_container(value, resolve=False), sort_keys=True)
        else:
            flat[dotted] = str(value)
    return flat


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("vlm_adapt_data_dir"):
        OmegaConf.register_new_resolver("vlm_adapt_data_dir", default_data_dir)
    if not OmegaConf.has_resolver("vlm_adapt_slurm_gpus"):
        OmegaConf.register_new_resolver("vlm_adapt_slurm_gpus", slurm_gpus)
    if not OmegaConf.has_resolver("vlm_adapt_wandb_offline"):
        OmegaConf.register_new_resolver("vlm_adapt_wandb_offline", wandb_offline)
    if not OmegaConf.has_resolver("vlm_adapt_mul"):
        OmegaConf.register_new_resolver("vlm_adapt_mul", multiply)
    if not OmegaConf.has_resolver("vlm_adapt_path_name"):
        OmegaConf.register_new_resolver("vlm_adapt_path_name", path_name)


register_resolvers()
