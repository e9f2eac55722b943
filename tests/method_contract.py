"""Checks every method's own tests share (the start of the registry-driven contract suite)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def training_losses(model: Any, batch: Any, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    """The training loss of `batch` over `steps` optimizer steps, through the method's own parts
    (`classification_forward` and `training_loss`, as the classification task runs them)."""
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        out = model.classification_forward(batch)
        loss = model.training_loss(out.logits, out.targets, out.text_features)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_loss_falls(model: Any, batch: Any, make_optimizer: Callable[[list], torch.optim.Optimizer],
                      steps: int = 20, factor: float = 0.8) -> list[float]:
    """The loss on one fixed batch ends below `factor` times where it started."""
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
    losses = training_losses(model, batch, optimizer, steps)
    assert losses[-1] < factor * losses[0], losses
    return losses


def train_then_evaluate(make_cfg: Callable[..., Any], tmp_path: Any, *overrides: str) -> tuple[dict, dict]:
    """(metrics.json of a tiny training run, `vlm-adapt eval` of its checkpoint on the same test batch);
    the caller asserts that both report the same accuracy."""
    import json

    from vlm_adapt.eval.evaluate import evaluate
    from vlm_adapt.train import train

    train(make_cfg(*overrides))
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "completed"
    evaluated = evaluate(make_cfg(f"ckpt_path={record['checkpoint']}", "data=imagenette", "loader.num_workers=0",
                                  "loader.eval_batch_size=250", "trainer.accelerator=cpu",
                                  *[o for o in overrides if o.startswith("trainer.limit_test_batches")],
                                  fast=False, config_name="eval", output="eval"))
    return record, evaluated
