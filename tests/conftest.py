"""Shared fixtures: offline environment, the shipped images, composing the real Hydra configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Offline and keyless, as in CI: nothing may reach a hub or the wandb servers.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLM_ADAPT_DATA_DIR", str(SHARED_DATA))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Small, fast settings on the tiny random-init backbone; tests add their own overrides.
FAST = [
    "backbone=tiny",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "loader.num_workers=0",
    "loader.eval_batch_size=250",
    "protocol.shots=2",
    "method.max_epochs=1",
    "method.batch_size=8",
]

# Options whose defaults name blocks the 4-block tiny backbone does not have (used by the registry-wide tests).
TINY_METHOD_OVERRIDES = {
    "skip_tuning": ["method.module.start_layer=2"],
    "maple": ["method.module.prompt_depth=2"],
    "vpt_deep": ["method.module.prompt_depth_vision=3"],
    "tcp": ["method.module.insert_layer=2"],
    "ivlp": ["method.module.prompt_depth_text=3", "method.module.prompt_depth_vision=2"],
}


def tiny_method_overrides(name: str) -> list[str]:
    """`method=<name>` plus what it needs to fit the tiny backbone."""
    return [f"method={name}", *TINY_METHOD_OVERRIDES.get(name, [])]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_ADAPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def compose_cfg(output_dir: Path, overrides: list[str], config_name: str = "train") -> DictConfig:
    """The real config tree composed as `vlm-adapt <config_name> overrides...` would, writing to output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="vlm_adapt.conf", version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.paths.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a real run: the task function never sees the hydra node
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path):
    """make_cfg("method=coop", ...) -> composed config with FAST settings, output in tmp_path/run."""

    def make(*overrides: str, fast: bool = True, config_name: str = "train", output: str = "run") -> DictConfig:
        return compose_cfg(tmp_path / output, (FAST if fast else []) + list(overrides), config_name)

    return make
