"""Learning-rate schedules from config.

- `dassl_cosine` (the paper recipes of CoOp, CLIPFit and Skip Tuning): Dassl's ConstantWarmupScheduler
  around `CosineAnnealingLR(T_max=max_epoch)`. The warm-up holds every parameter group at the absolute
  rate `warmup_lr` for W epochs; the cosine then counts from 0 at epoch W over T = total epochs (warm-up
  included), so epoch e >= W uses base * (1 + cos(pi (e - W) / T)) / 2 and the last epoch never reaches 0.
- `cosine` (vlm_adapt's own): the warm-up holds each group at `warmup_lr` scaled by its share of the
  first group's rate, then the cosine runs over the remaining T - W periods and ends at `eta_min`
  (default 0; CLIP-LoRA's `CosineAnnealingLR(T_max=iterations, eta_min=1e-6)` without warm-up).
- `clip4clip` (UniPT's retrieval recipe, per step): BertAdam's `warmup_cosine` - linear warm-up over the
  first `warmup_proportion` of the steps, then base * (1 + cos(pi x)) / 2 at progress x = step / total.
- `none`: a constant rate.
W and T count epochs or steps, as the method's `scheduler_interval` says.
"""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LambdaLR, LRScheduler, SequentialLR

from vlm_adapt.errors import ConfigError

SCHEDULERS = ("dassl_cosine", "cosine", "clip4clip", "none")


def dassl_cosine_factor(period: int, base_lr: float, total: int, warmup: int, warmup_lr: float) -> float:
    """Multiplier of `base_lr` in `period` under Dassl's constant warm-up + cosine (see the module doc)."""
    if period < warmup:
        return warmup_lr / base_lr
    return 0.5 * (1.0 + math.cos(math.pi * (period - warmup) / total))


def clip4clip_factor(step: int, total: int, warmup_proportion: float) -> float:
    """BertAdam's `warmup_cosine` at progress x = step / total (CLIP4Clip, UniPT)."""
    x = step / max(1, total)
    if x < warmup_proportion:
        return x / warmup_proportion
    return 0.5 * (1.0 + math.cos(math.pi * x))


def build_scheduler(optimizer: Optimizer, cfg: dict[str, Any] | None, total: int) -> LRScheduler | None:
    """`cfg`: {name, warmup: W, warmup_lr: lr, warmup_proportion: p, eta_min}; `total` periods (epochs or
    steps)."""
    cfg = cfg or {}
    name = cfg.get("name", "none")
    if name in (None, "none"):
        return None
    if name not in SCHEDULERS:
        raise ConfigError(f"method.module.scheduler.name must be one of {', '.join(SCHEDULERS)}; got {name!r}")
    warmup = int(cfg.get("warmup", 0))
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    if name == "dassl_cosine":
        warmup_lr = float(cfg.get("warmup_lr", base_lrs[0]))
        return LambdaLR(optimizer, [
            lambda e, lr=lr: dassl_cosine_factor(e, lr, max(1, total), warmup, warmup_lr) for lr in base_lrs
        ])
    if name == "clip4clip":
        proportion = float(cfg.get("warmup_proportion", 0.1))
        return LambdaLR(optimizer, lambda step: clip4clip_factor(step, total, proportion))
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=float(cfg.get("eta_min", 0.0)))
    if warmup <= 0:
        return cosine
    hold = ConstantLR(optimizer, factor=float(cfg.get("warmup_lr", base_lrs[0])) / base_lrs[0], total_iters=warmup)
    return SequentialLR(optimizer, [hold, cosine], milestones=[warmup])
