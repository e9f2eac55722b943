"""Builders shared by `train`, `eval` and `bench`: config -> datamodule, method, callbacks, loggers, trainer."""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from vlm_adapt.backbones import Backbone, load_backbone
from vlm_adapt.checkpoints import AtomicCheckpointIO
from vlm_adapt.data.captions import CaptionRetrievalDataModule, is_retrieval
from vlm_adapt.data.datamodule import ClassificationDataModule
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.base import CLIPMethod

log = logging.getLogger(__name__)


def to_plain(cfg: Any) -> Any:
    """Resolved plain Python values (dicts, lists), so nothing Hydra-typed reaches a module or checkpoint."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def build_backbone(cfg: DictConfig) -> Backbone:
    """The configured backbone; random weights are initialised from the run's seed (`backbone.init_seed`)."""
    kwargs = dict(to_plain(cfg.backbone))
    kwargs.setdefault("init_seed", cfg.get("seed"))
    return load_backbone(**kwargs)


def build_datamodule(cfg: DictConfig) -> ClassificationDataModule | CaptionRetrievalDataModule:
    method = cfg.get("method") or {}
    if is_retrieval(to_plain(cfg.protocol), to_plain(cfg.data)):
        return CaptionRetrievalDataModule(
            dataset=to_plain(cfg.data),
            protocol=to_plain(cfg.protocol),
            batch_size=method.get("batch_size", 32),
            eval_batch_size=cfg.loader.eval_batch_size,
            num_workers=cfg.loader.num_workers,
            augment=method.get("augment") or cfg.data.get("augment", "none"),
        )
    return ClassificationDataModule(
        dataset=to_plain(cfg.data),
        protocol=to_plain(cfg.protocol),
        seed=cfg.seed,
        batch_size=method.get("batch_size", 32),
        eval_batch_size=cfg.loader.eval_batch_size,
        num_workers=cfg.loader.num_workers,
        augment=method.get("augment") or cfg.data.get("augment", "coop"),
        cache_dir=cfg.paths.cache_dir,
        targets=to_plain(cfg.protocol.get("targets")),
        drop_last=bool(method.get("drop_last", False)),
        prompt_templates=cfg.get("prompt_templates", "dataset"),
    )


def method_class(target: str) -> type[CLIPMethod]:
    cls = hydra.utils.get_class(target)
    if not (isinstance(cls, type) and issubclass(cls, CLIPMethod)):
        raise TypeError(f"{target} is not a CLIPMethod")
    if "spec" not in vars(cls):  # a subclass inherits its parent's spec: it must register its own name
        raise ConfigError(f"{target} is not a registered method; decorate it with "
                          "@register_method(...) from vlm_adapt.methods.registry")
    return cls


def build_method(module_cfg: dict[str, Any], backbone: Backbone) -> CLIPMethod:
    kwargs = dict(to_plain(module_cfg))
    return method_class(kwargs.pop("_target_"))(backbone=backbone, **kwargs)


def build_loggers(cfg: DictConfig) -> list[Logger]:
    return [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    return [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback], loggers: list[Logger]) -> L.Trainer:
    # checkpoints written to a temporary name and renamed: a crash mid-save keeps the previous one
    plugins = [*(cfg.trainer.get("plugins") or []), AtomicCheckpointIO()]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    requested = str(cfg.trainer.get("precision"))
    device = trainer.strategy.root_device.type
    if requested in ("16", "16-mixed") and trainer.precision != "16-mixed":
        # Lightning runs fp16 AMP on CPU as bf16-mixed with only a warning: the run would be measured and
        # recorded under a precision it did not use
        raise ConfigError(
            f"trainer.precision={requested} (fp16 mixed precision) needs a GPU, but this run is on "
            f"{device}. Use trainer.precision=bf16-mixed on CPU, or a GPU (trainer=gpu)."
        )
    if requested in ("16-true", "half") and device != "cuda":
        # pure fp16 (the references' fp16: weights and optimizer state in half precision) is a GPU recipe;
        # on CPU half-precision kernels are slow or missing and the numbers would not be the references'
        raise ConfigError(
            f"trainer.precision={requested} (pure fp16 weights and optimizer state, as the reference code "
            f"trains) needs a GPU, but this run is on {device}. Use trainer.precision=bf16-mixed or 32-true "
            "on CPU, or a GPU (trainer=gpu trainer.precision=16-true)."
        )
    return trainer
