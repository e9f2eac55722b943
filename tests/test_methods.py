"""Shared tests every method passes: compose, train, trainable set, checkpoint round trip, eval."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_METHOD_OVERRIDES

from vlm_adapt.build import build_backbone, build_method
from vlm_adapt.errors import BackboneMismatchError
from vlm_adapt.eval.evaluate import evaluate
from vlm_adapt.train import train

METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (REPO / "conf" / "data").glob("*.yaml"))

ON_TINY = TINY_METHOD_OVERRIDES  # what a method needs on the 4-layer tiny backbone (its defaults are ViT-B's)

# Per-method overrides that make a few steps on one fixed batch visibly lower the loss.
OVERFIT = {
    "coop": ["method.module.optimizer.lr=0.05"],
    "ft": ["method.module.optimizer.lr=0.01"],
    "skip_tuning": [*ON_TINY["skip_tuning"], "method.module.optimizer.lr=0.01"],
}


def trainable_names(cfg) -> list[str]:
    model = build_method(cfg.method.module, build_backbone(cfg))
    return model.trainable_parameter_names()


def assert_composes(make_cfg, method: str, dataset: str) -> None:
    cfg = make_cfg(f"method={method}", f"data={dataset}", "data.root=/any/where")
    assert cfg.method.module._target_.startswith("vlm_adapt.methods.")
    assert cfg.data.name and cfg.data.root == "/any/where"
    if cfg.data.layout != "coco_captions":  # classification datasets prompt with templates
        assert cfg.data.templates


@pytest.mark.parametrize("method", METHODS)
def test_every_method_composes_with_a_dataset(make_cfg, method):
    assert_composes(make_cfg, method, "dtd")


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_composes_with_a_method(make_cfg, dataset):
    assert_composes(make_cfg, "coop", dataset)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_composes_with_every_dataset(make_cfg, method, dataset):
    """The whole product (the groups are independent, so the fast tests above take one side each)."""
    assert_composes(make_cfg, method, dataset)


def test_coop_trains_only_the_context(make_cfg):
    assert trainable_names(make_cfg("method=coop")) == ["ctx"]


def test_ft_trains_everything_but_logit_scale(make_cfg):
    cfg = make_cfg("method=ft")
    model = build_method(cfg.method.module, build_backbone(cfg))
    expected = {f"clip.{n}" for n, _ in model.clip.named_parameters()} - {"clip.logit_scale"}
    assert set(model.trainable_parameter_names()) == expected


def test_zero_shot_trains_nothing(make_cfg):
    assert trainable_names(make_cfg("method=zero_shot")) == []


def test_linear_probe_trains_only_its_head(make_cfg, tmp_path):
    cfg = make_cfg("method=linear_probe", "protocol.shots=4")
    train(cfg)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    checkpoint = torch.load(record["checkpoint"], weights_only=True)
    assert set(checkpoint["state_dict"]) == {"head.weight", "head.bias"}
    assert record["cost"]["trainable_params"] == 10 * 64 + 10
    assert "val/acc" in record["metrics"]


def read_losses(run: Path) -> list[float]:
    with open(run / "csv" / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


@pytest.mark.parametrize("method", sorted(OVERFIT))
def test_loss_falls_on_a_fixed_batch(make_cfg, tmp_path, method):
    cfg = make_cfg(
        f"method={method}", *OVERFIT[method], "data.augment=none", "trainer.overfit_batches=1",
        "method.max_epochs=6", "trainer.log_every_n_steps=1", "method.module.scheduler.name=none",
        "trainer.limit_val_batches=0", "trainer.limit_test_batches=1",
    )
    train(cfg)
    losses = read_losses(tmp_path / "run")
    assert len(losses) == 6
    assert losses[-1] < losses[0] * 0.9


def test_run_resumes_from_its_last_checkpoint(make_cfg, tmp_path, monkeypatch):
    """The same command again in the directory of a run that crashed continues it from its last checkpoint."""
    from vlm_adapt.divergence import DivergenceGuard

    def crash_in_second_epoch(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(DivergenceGuard, "on_train_epoch_start", crash_in_second_epoch, raising=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_cfg("method=coop", "method.max_epochs=2", "trainer.limit_test_batches=1"))
    first = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert json.loads((tmp_path / "run/metrics.json").read_text())["status"] == "failed"
    monkeypatch.undo()
    train(make_cfg("method=coop", "method.max_epochs=2", "trainer.limit_test_batches=1"))
    second = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert first["epoch"] == 0 and second["epoch"] == 1
    assert second["global_step"] == 2 * first["global_step"]
    assert not torch.equal(first["state_dict"]["ctx"], second["state_dict"]["ctx"])
    assert json.loads((tmp_path / "run/metrics.json").read_text())["status"] == "completed"


def test_checkpoint_evaluates_on_another_dataset_and_rejects_another_backbone(make_cfg, tmp_path):
    train(make_cfg("method=coop", "trainer.limit_test_batches=1"))
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    record = evaluate(make_cfg(f"ckpt_path={ckpt}", "data=imagenet_samples", "loader.num_workers=0",
                               "trainer.accelerator=cpu", fast=False, config_name="eval", output="eval"))
    assert record["method"] == "coop" and record["dataset"] == "imagenet_samples"
    assert 0 <= record["metrics"]["test/imagenet_samples/acc"] <= 100
    assert json.loads((tmp_path / "eval/metrics.json").read_text())["metrics"] == record["metrics"]
    with pytest.raises(BackboneMismatchError, match="vlm-tiny.*ViT-B-32"):
        evaluate(make_cfg(f"ckpt_path={ckpt}", "backbone=vit_b32", "backbone.pretrained=null",
                          "trainer.accelerator=cpu", fast=False, config_name="eval", output="eval2"))


def test_zero_shot_on_1000_classes_encodes_text_in_chunks(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg("method=zero_shot", "data=imagenet_samples", "+method.module.text_chunk_size=128")
    chunk_sizes = []
    from vlm_adapt.backbones import towers

    original = towers.CLIPTowers.encode_text

    def spy(self, tokens):
        chunk_sizes.append(len(tokens))
        return original(self, tokens)

    monkeypatch.setattr(towers.CLIPTowers, "encode_text", spy)
    train(cfg)
    record = json.loads((tmp_path / "run/metrics.json").read_text())
    assert "test/imagenet_samples/acc" in record["metrics"]
    assert sum(chunk_sizes) == 1000 and max(chunk_sizes) == 128
