"""Checks every method's own tests share, and the pieces of the registry-wide suites (tests/test_contract.py:
every registered method; tests/test_experiments.py: every experiment config): a probe of a run's module,
the data each protocol runs on in tests, and the ImageNet variants built from the shipped samples."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from conftest import REPO, SHARED_DATA
from omegaconf import DictConfig, OmegaConf

from vlm_adapt.methods.base import CLIPMethod


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


# ---------------------------------------------------------------- the registry-wide suites
class ContractProbe(L.Callback):
    """Watches one run (`+callbacks.contract._target_=method_contract.ContractProbe`): the module it
    ran, its state dict just before the first training batch and the parameters backward reached
    (`grads`: a gradient, possibly zero, as LoRA's A at its first step; `nonzero_grads`: a nonzero one)."""

    last: ClassVar[ContractProbe | None] = None  # the probe of the latest run started in this process

    def __init__(self) -> None:
        self.module: Any = None
        self.before: dict[str, torch.Tensor] = {}
        self.grads: set[str] = set()
        self.nonzero_grads: set[str] = set()
        ContractProbe.last = self

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.module = pl_module

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before = {key: value.detach().clone() for key, value in pl_module.state_dict().items()}

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                self.grads.add(name)
                if bool(p.grad.ne(0).any()):
                    self.nonzero_grads.add(name)


PROBE = ["+callbacks.contract._target_=method_contract.ContractProbe"]


def assert_reports_its_test_sets(record: dict[str, Any], model: Any) -> None:
    """A run's metrics.json reports what its test sets measure: retrieval, the recalls; classification,
    test/<space>/acc for every test label space the method scores (a method that scores only some says
    so in `supports_label_space`) and nothing for the others, and HM with base and new."""
    metrics = record["metrics"]
    if model.retrieval:
        assert 0.0 <= metrics["test/rsum"] <= 600.0, metrics
        return
    for space in model.test_label_spaces:
        key = f"test/{space.name}/acc"
        if model.supports_label_space(space):
            assert 0.0 <= metrics[key] <= 100.0, (key, metrics)
        else:
            assert type(model).supports_label_space is not CLIPMethod.supports_label_space
            assert key not in metrics, (key, metrics)
    assert "test/hm" in metrics or not {"test/base/acc", "test/new/acc"} <= metrics.keys()

# One short epoch: a training batch, a validation batch and a small test batch of every test set.
ONE_BATCH = ["trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
             "loader.eval_batch_size=8"]


def protocol_targets(protocol: str) -> list[str]:
    """The target datasets conf/protocol/<protocol>.yaml composes into protocol.targets."""
    defaults = OmegaConf.load(REPO / "conf" / "protocol" / f"{protocol}.yaml").get("defaults") or []
    return [key.split("@targets.", 1)[1] for entry in defaults if isinstance(entry, DictConfig | dict)
            for key in entry if "@targets." in key]


# the ImageNet variants build_imagenet_variants makes with all 1000 classes (A and R hold a handful)
THOUSAND_CLASS_VARIANTS = ("imagenet_v2", "imagenet_sketch")


def protocol_data(protocol: str, variants_root: Path | None = None, thousand_classes: bool = False) -> list[str]:
    """Overrides that run `protocol` on the shipped images: Imagenette for classification (the source of
    cross-dataset and domain-generalization runs too), coco-mini for retrieval. The targets: of a
    cross-dataset run ImageNet-R (3 classes), of a domain-generalization run ImageNet-A and -R, both built
    by `build_imagenet_variants` in `variants_root`; with `thousand_classes` the 1000-class imagenet-samples
    is the cross-dataset target and ImageNet-V2 and -Sketch (1000 classes each) join the domain-generalization
    targets (every test image is scored against 1000 prompts: slow for methods that prompt per image)."""
    if protocol == "retrieval":
        return ["protocol=retrieval", "data=coco_captions"]
    overrides = [f"protocol={protocol}", "data=imagenette"]
    if protocol not in ("cross_dataset", "domain_generalization"):
        return overrides
    if variants_root is None:
        raise ValueError(f"{protocol} runs on build_imagenet_variants(root): pass its root")
    overrides += [f"paths.data_dir={variants_root}"]
    if protocol == "cross_dataset":
        overrides += [f"~data@protocol.targets.{name}" for name in protocol_targets(protocol)]
        target = "imagenet_samples" if thousand_classes else "imagenet_r"
        overrides += [f"+data@protocol.targets.{target}={target}"]
    elif not thousand_classes:
        overrides += [f"~data@protocol.targets.{name}" for name in THOUSAND_CLASS_VARIANTS]
    return overrides


def _link_classes(folder: Path, wnids: list[str]) -> None:
    folder.mkdir(parents=True)
    for wnid in wnids:
        (folder / wnid).symlink_to(SHARED_DATA / "imagenet-samples" / "images" / wnid)


def build_imagenet_variants(root: Path) -> dict[str, list[str]]:
    """ImageNet-V2, -Sketch, -A and -R in their usual (CoOp DATASETS.md) layouts under `root`, built from
    imagenet-samples by symlinks, with Imagenette and imagenet-samples beside them (for
    `paths.data_dir=root`). Returns the wnids of the classes A and R hold."""
    classnames = SHARED_DATA / "imagenet-samples" / "classnames.txt"
    wnids = [line.split(" ", 1)[0] for line in classnames.read_text().splitlines() if line.strip()]
    subsets = {"imagenet_a": [wnids[i] for i in (999, 1, 42, 300, 7)], "imagenet_r": [wnids[i] for i in (5, 500, 3)]}
    for name, folder in (("imagenet_a", "imagenet-adversarial/imagenet-a"),
                         ("imagenet_r", "imagenet-rendition/imagenet-r")):
        _link_classes(root / folder, subsets[name])
        shutil.copy(classnames, root / folder.split("/")[0] / "classnames.txt")
    v2 = root / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    v2.mkdir(parents=True)
    for index, wnid in enumerate(wnids):  # the release names class folders 0..999
        (v2 / str(index)).symlink_to(SHARED_DATA / "imagenet-samples" / "images" / wnid)
    shutil.copy(classnames, root / "imagenetv2" / "classnames.txt")
    _link_classes(root / "imagenet-sketch" / "images", wnids)
    shutil.copy(classnames, root / "imagenet-sketch" / "classnames.txt")
    for name in ("imagenette", "imagenet-samples"):
        (root / name).symlink_to(SHARED_DATA / name)
    return subsets


def reference_prompted_text_features(clip, tokenizer, prefix: str, ctx, deep: list, classnames) -> torch.Tensor:
    """The deep-prompt references' TextEncoder (muzairkhattak/multimodal-prompt-learning) over all 77 positions:
    "<prefix> <class>." with `ctx` at positions 1..M, replaced by deep[i - 1] before text block i (1 <= i <=
    len(deep)); normalized EOT features."""
    m = len(ctx)
    tokens = tokenizer([f"{prefix} {name}." for name in classnames])
    words = clip.token_embedding(tokens)
    x = torch.cat([words[:, :1], ctx.expand(len(tokens), -1, -1), words[:, 1 + m:]], dim=1)
    x = x + clip.positional_embedding
    for i, block in enumerate(clip.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:, :1], deep[i - 1].expand(len(tokens), -1, -1), x[:, 1 + m:]], dim=1)
        x = block(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)[torch.arange(len(tokens)), tokens.argmax(-1)] @ clip.text_projection
    return torch.nn.functional.normalize(x, dim=-1)


def reference_prompted_image_features(visual, first, deep: list, images) -> torch.Tensor:
    """The deep-prompt references' VisionTransformer: `first` appended after the positional embedding, before
    ln_pre; before block i (1 <= i <= len(deep)) the last tokens replaced by deep[i - 1]; ln_post on the class
    token, then the projection."""
    n, m = len(images), len(first)
    x = visual.conv1(images).flatten(2).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.expand(n, 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(torch.cat([x, first.expand(n, -1, -1)], dim=1))
    for i, block in enumerate(visual.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:, : x.shape[1] - m], deep[i - 1].expand(n, -1, -1)], dim=1)
        x = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj
