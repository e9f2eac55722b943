"""Learning-rate schedules from config: CoOp's constant warm-up followed by cosine annealing."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LRScheduler, SequentialLR

from vlm_adapt.errors import ConfigError


def build_scheduler(optimizer: Optimizer, cfg: dict[str, Any] | None, total: int) -> LRScheduler | None:
    """`cfg`: {name: cosine|none, warmup: W, warmup_lr: lr}; W and `total` count epochs or steps.

    The warm-up holds the learning rate at `warmup_lr` for W periods (CoOp's ConstantWarmupScheduler),
    then cosine annealing runs over the remaining `total - W` periods.
    """
    name = (cfg or {}).get("name", "none")
    if name in (None, "none"):
        return None
    if name != "cosine":
        raise ConfigError(f"method.module.scheduler.name must be 'cosine' or 'none', got {name!r}")
    warmup = int(cfg.get("warmup", 0))
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if warmup <= 0:
        return cosine
    base_lr = optimizer.param_groups[0]["lr"]
    hold = ConstantLR(optimizer, factor=float(cfg.get("warmup_lr", base_lr)) / base_lr, total_iters=warmup)
    return SequentialLR(optimizer, [hold, cosine], milestones=[warmup])
