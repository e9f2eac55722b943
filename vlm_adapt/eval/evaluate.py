"""`vlm-adapt eval ckpt_path=... data=...`: a trained method evaluated on any dataset (cross-dataset use).

The checkpoint says which method class and backbone it belongs to; the backbone is rebuilt from
the checkpoint unless `backbone=` is given, in which case it must be the same one.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from vlm_adapt import config as _config
from vlm_adapt.backbones import load_backbone
from vlm_adapt.build import build_datamodule, build_loggers, build_trainer, method_class, to_plain
from vlm_adapt.checkpoints import CHECKPOINT_KEY, read_checkpoint
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.errors import exit_on_user_error
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.metrics.cost import CostMonitor
from vlm_adapt.metrics.record import run_identity, task_metrics, write_metrics
from vlm_adapt.run_dir import check_seed, claim_run_directory, record_failure

log = logging.getLogger(__name__)


def load_method(
    checkpoint: dict[str, Any], backbone_cfg: dict[str, Any] | None, test_spaces: list[LabelSpace]
) -> CLIPMethod:
    """Rebuild the method from a checkpoint's class, hyperparameters and trained tensors, attached to the
    checkpoint's training label space and the given test label spaces."""
    meta = checkpoint[CHECKPOINT_KEY]
    if backbone_cfg is not None and backbone_cfg.get("pretrained") is None:
        backbone_cfg = {"init_seed": meta["backbone"].get("init_seed"), **backbone_cfg}  # the trained-on weights
    backbone = load_backbone(**(backbone_cfg or meta["backbone"]))
    model = method_class(meta["method_class"])(backbone=backbone, **checkpoint.get("hyper_parameters", {}))
    space = meta.get("train_label_space")
    model.attach_label_spaces(LabelSpace(**space) if space else None, test_spaces)
    model.on_load_checkpoint(checkpoint)  # checks the backbone identity before any tensor is loaded
    model.load_state_dict(checkpoint["state_dict"], strict=False)
    return model


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    started = time.perf_counter()
    check_seed(cfg)
    output_dir = cfg.paths.output_dir
    with claim_run_directory(cfg, output_dir) as digest:
        record: dict[str, Any] = {"task_name": cfg.task_name, "status": "running", "output_dir": output_dir,
                                  "checkpoint": str(cfg.ckpt_path), "config_digest": digest}
        try:
            datamodule = build_datamodule(cfg)
            checkpoint = read_checkpoint(cfg.ckpt_path)
            backbone_cfg = to_plain(cfg.backbone) if cfg.get("backbone") else None
            model = load_method(checkpoint, backbone_cfg, datamodule.test_label_spaces)
            datamodule.set_preprocessing(model.clip.visual.preprocess_cfg)

            cost = CostMonitor()
            trainer: L.Trainer = build_trainer(cfg, [cost], build_loggers(cfg))
            trainer.test(model, datamodule=datamodule)
        except BaseException as err:
            record_failure(output_dir, record, err)
            raise
        meta = checkpoint[CHECKPOINT_KEY]
        record = run_identity(cfg, meta["method"], model.backbone_identity) | record | {
            "status": "completed",
            "metrics": task_metrics(trainer.callback_metrics),
            "cost": cost.final_figures(model) | {"wall_time_s": round(time.perf_counter() - started, 3)},
        }
        if trainer.is_global_zero:
            path = write_metrics(output_dir, record)
            print(f"metrics: {path}", *[f"  {k} = {v}" for k, v in record["metrics"].items()], sep="\n", flush=True)
    return record


@hydra.main(version_base="1.3", config_path=_config.CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error("eval"):
        evaluate(cfg)
