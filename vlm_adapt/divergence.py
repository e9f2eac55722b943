"""Stopping a run whose training diverged, before it writes a checkpoint or a result.

A learning rate that is too high, or a half-precision overflow (16-mixed, 16-true), turns the loss and
then the trained tensors into NaN or inf; Lightning trains on, tests the broken model and reports an
accuracy that looks normal. `DivergenceGuard` checks the loss of every training step and the
trainable tensors before every checkpoint save and at the end of training, and stops the run with a
`DivergedError` naming the step and the likely fix; `vlm-adapt train` records the run as `diverged`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from vlm_adapt.errors import DivergedError


def non_finite_tensors(module: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters holding a NaN or an infinity."""
    return [name for name, p in module.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]


class DivergenceGuard(L.Callback):
    """Raises `DivergedError` at the first non-finite training loss or trainable tensor."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss.detach()).all():
            raise DivergedError(self._message(trainer, pl_module, f"the training loss is {loss.item()}", batch_idx))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._check_tensors(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_tensors(trainer, pl_module)

    def _check_tensors(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bad = non_finite_tensors(pl_module)
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise DivergedError(self._message(trainer, pl_module, f"trained tensors hold NaN/inf ({shown})"))

    @staticmethod
    def _message(trainer: L.Trainer, pl_module: L.LightningModule, what: str, batch_idx: int | None = None) -> str:
        where = f"optimizer step {trainer.global_step}, epoch {trainer.current_epoch}"
        if batch_idx is not None:
            where += f", batch {batch_idx}"
        lrs = sorted({group["lr"] for opt in trainer.optimizers for group in opt.param_groups})
        lr_text = ", ".join(f"{lr:g}" for lr in lrs) or "n/a"
        precision = str(trainer.precision)
        fix = "lower the learning rate (method.module.optimizer.lr) or add warm-up"
        if precision.startswith("16"):
            fix += f"; {precision} overflows easily: try trainer.precision=bf16-mixed or 32-true"
        return (
            f"training diverged at {where}: {what} (learning rate {lr_text}, precision {precision}). "
            f"No checkpoint was written from this point; {fix}."
        )
