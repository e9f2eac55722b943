"""`vlm-adapt train`: datamodule -> backbone -> method -> trainer; fit, test, write metrics.json.

Returns the value of `optimized_metric` so Optuna sweeps can maximise it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vlm_adapt import config as _config  # noqa: F401  (registers resolvers)
from vlm_adapt.backbones.loading import RANDOM_INIT_BANNER
from vlm_adapt.build import (
    build_backbone,
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_method,
    build_trainer,
)
from vlm_adapt.checkpoints import read_checkpoint
from vlm_adapt.data.captions import CaptionRetrievalDataModule
from vlm_adapt.distributed import point_ddp_relaunch_at_job
from vlm_adapt.divergence import DivergenceGuard
from vlm_adapt.errors import ConfigError, exit_on_user_error
from vlm_adapt.methods.registry import RETRIEVAL, methods_supporting
from vlm_adapt.metrics.cost import CostMonitor
from vlm_adapt.metrics.record import run_identity, task_metrics, write_metrics
from vlm_adapt.resume import ResumeState
from vlm_adapt.run_dir import check_seed, claim_run_directory, process_rank, record_failure

log = logging.getLogger(__name__)


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """An explicit `ckpt_path`, else with `resume: true` the run directory's own last checkpoint."""
    if cfg.get("ckpt_path"):
        read_checkpoint(cfg.ckpt_path)  # refuses directories, foreign files and pickled code with a clear error
        return str(cfg.ckpt_path)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    partial = last.with_name(last.name + ".tmp")
    if partial.is_file():  # a save cut short by a crash; last.ckpt is still the previous complete one
        log.warning("Removing %s, a checkpoint save interrupted by a crash", partial)
        partial.unlink()
    if cfg.get("resume") and last.is_file():
        read_checkpoint(last, key="the run directory's checkpoints/last.ckpt", hint=(
            f"to start this run over, move it aside (mv {last} {last}.corrupt) and rerun, or pass overwrite=true"))
        log.info("Resuming from %s", last)
        return str(last)
    return None


def finish_loggers(trainer: L.Trainer, record: dict[str, Any]) -> None:
    """Send the run's figures to every logger and close them.

    Task metrics go under `final/`, in percent as in metrics.json (during the run Lightning logged
    the same names as fractions).
    """
    flat = {f"final/{k}": v for k, v in record["metrics"].items()}
    flat.update({f"cost/{k}": v for k, v in record["cost"].items() if isinstance(v, (int, float))})
    for logger in trainer.loggers:
        logger.log_metrics(flat)
    close_loggers(trainer, "success")


def close_loggers(trainer: L.Trainer, status: str) -> None:
    """Finalize every logger and end the wandb run, so that the next job of a multirun starts its own."""
    for logger in trainer.loggers:
        logger.finalize(status)
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish(exit_code=0 if status == "success" else 1)


def train(cfg: DictConfig) -> float | None:
    started = time.perf_counter()
    check_seed(cfg)
    output_dir = Path(cfg.paths.output_dir)
    with claim_run_directory(cfg, output_dir) as digest:
        requested = {"model_name": cfg.backbone.get("model_name"), "pretrained": cfg.backbone.get("pretrained")}
        record = run_identity(cfg, cfg.method.name, requested) | {
            "status": "running", "output_dir": str(output_dir), "config_digest": digest}
        if process_rank() == 0:
            write_metrics(output_dir, record)  # a run that fails from here on is listed as failed, not missing
        trainer: L.Trainer | None = None
        try:
            L.seed_everything(cfg.seed, workers=True)
            datamodule = build_datamodule(cfg)  # reads the splits first: a bad dataset fails before the model loads
            backbone = build_backbone(cfg)
            record.update(run_identity(cfg, cfg.method.name, backbone.identity),
                          few_shot=getattr(datamodule, "few_shot_record", None))  # shots asked and used
            datamodule.set_preprocessing(backbone.model.visual.preprocess_cfg)
            model = build_method(cfg.method.module, backbone)
            if isinstance(datamodule, CaptionRetrievalDataModule):
                if not model.spec.supports(RETRIEVAL):
                    raise ConfigError(
                        f"method={cfg.method.name} has no image-text retrieval mode; protocol=retrieval needs one "
                        f"of {', '.join(f'method={name}' for name in methods_supporting(RETRIEVAL))}."
                    )
            else:  # classification: the label spaces the model trains and tests on
                model.attach_label_spaces(datamodule.train_label_space, datamodule.test_label_spaces)

            cost, resume_state = CostMonitor(), ResumeState()  # resume_state first: it restores the random states
            callbacks = [resume_state, cost, DivergenceGuard(), *build_callbacks(cfg)]
            trainer = build_trainer(cfg, callbacks, build_loggers(cfg))
            point_ddp_relaunch_at_job(trainer, output_dir)
            for logger in trainer.loggers:
                logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            fit_metrics: dict[str, Any] = {}
            if model.trains:
                trainer.fit(model, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg), weights_only=True)
                fit_metrics = dict(trainer.callback_metrics)  # the test loop resets callback_metrics
            trainer.test(model, datamodule=datamodule)
            checkpoint = output_dir / "checkpoints" / "last.ckpt"
            # rank 0 decides for all ranks: saving is collective, and rank 0 may have written the file already
            if not trainer.strategy.broadcast(checkpoint.is_file()):  # zero-shot, or no optimizer steps
                trainer.save_checkpoint(checkpoint)
        except BaseException as err:
            record_failure(output_dir, record, err)
            if trainer is not None:
                close_loggers(trainer, "failed")
            raise
        record.update(
            status="completed",
            metrics=task_metrics(fit_metrics | dict(trainer.callback_metrics)),
            cost=cost.final_figures(model) | {"wall_time_s": round(time.perf_counter() - started, 3)},
            checkpoint=str(checkpoint),
            resumes=resume_state.resumes,  # where each resume of this run started; [] when none
        )
        if trainer.is_global_zero:
            path = write_metrics(output_dir, record)
            announce(record, path, backbone.random_init)
        finish_loggers(trainer, record)
    return record["metrics"].get(cfg.get("optimized_metric") or "")


@rank_zero_only
def announce(record: dict[str, Any], path: Path, random_init: bool) -> None:
    lines = [f"metrics:    {path}", f"checkpoint: {record['checkpoint']}"]
    lines += [f"  {k} = {v}" for k, v in record["metrics"].items()]
    lines += [f"  cost/{k} = {v}" for k, v in record["cost"].items()]
    if random_init:
        lines.append(RANDOM_INIT_BANNER.format(model=record["backbone"]))
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path=_config.CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with exit_on_user_error("train"):
        return train(cfg)
