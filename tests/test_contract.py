"""The contract every registered method keeps, checked for each one the registry lists (a new method is
covered without writing a test): on the tiny backbone with the shipped images,

- only the tensors it declares train: one real training step through the classification task leaves
  every tensor a checkpoint does not hold bit-identical (the frozen CLIP weights above all), and only
  `trainable_parameter_names()` get a gradient; a method with fit="none" has none;
- its checkpoint holds exactly `checkpoint_state_names()` and, loaded into a freshly built model as
  `vlm-adapt eval` loads it, gives the trained model's logits;
- the loss falls on a fixed batch (fit="gradient"), at one learning rate per optimizer family;
- it runs every protocol of every task it registers (`vlm-adapt train`, metrics.json completed) and
  refuses the others with a clear error.

Fast: one few-shot run per method (the first three checks read it), base-to-new (and retrieval where it
is claimed), and the refusals. Slow: the cross-dataset and domain-generalization runs, with small and with
1000-class targets (each test image against 1000 prompts: long for methods that prompt per image).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
from conftest import FAST, REPO, compose_cfg, tiny_method_overrides
from method_contract import (
    ONE_BATCH,
    PROBE,
    ContractProbe,
    assert_loss_falls,
    assert_reports_its_test_sets,
    build_imagenet_variants,
    protocol_data,
)
from omegaconf import OmegaConf

from vlm_adapt.checkpoints import read_checkpoint
from vlm_adapt.errors import ConfigError
from vlm_adapt.eval.evaluate import load_method
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.registry import CLASSIFICATION, RETRIEVAL, TASKS, methods_supporting, registered_methods
from vlm_adapt.train import train

METHODS = registered_methods()


def protocols_by_task() -> dict[str, list[str]]:
    """The training protocols of conf/protocol/ by the task they run (their `task:`, classification by
    default); `eval` is `vlm-adapt eval`'s (the whole test split, no training)."""
    protocols: dict[str, list[str]] = {task: [] for task in TASKS}
    for path in sorted((REPO / "conf" / "protocol").glob("*.yaml")):
        if path.stem != "eval":
            protocols[OmegaConf.load(path).get("task", CLASSIFICATION)].append(path.stem)
    return protocols


PROTOCOLS = protocols_by_task()
assert "few_shot" in PROTOCOLS[CLASSIFICATION] and PROTOCOLS[RETRIEVAL]

# The fixed-batch loss check: 20 steps of the method's own optimizer class, without weight decay or a
# schedule, at one learning rate per optimizer family; the loss ends below 90 % of where it started.
FAMILY_OPTIMIZER = {
    "SGD": {"lr": 0.1, "momentum": 0.9},
    "Adam": {"lr": 1e-2},
    "AdamW": {"lr": 1e-2},
}
LOSS_STEPS, LOSS_FACTOR = 20, 0.9


@pytest.fixture(scope="session")
def variants_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet_variants")
    build_imagenet_variants(root)
    return root


@dataclass
class Run:
    """One `vlm-adapt train` run of a method, watched by ContractProbe."""

    cfg: Any
    record: dict[str, Any]
    probe: ContractProbe
    after: dict[str, torch.Tensor]  # the module's state dict at the end of the run
    images: torch.Tensor  # a fixed batch of test images
    logits: torch.Tensor  # the trained model's logits of `images` on the first test label space

    @property
    def model(self) -> CLIPMethod:
        return self.probe.module


def run_method(output: Path, name: str, *overrides: str) -> tuple[Any, dict[str, Any], ContractProbe]:
    cfg = compose_cfg(output, [*FAST, *tiny_method_overrides(name), *ONE_BATCH, *PROBE, *overrides])
    ContractProbe.last = None
    train(cfg)
    record = json.loads((output / "metrics.json").read_text())
    assert record["status"] == "completed" and record["method"] == name, record
    assert ContractProbe.last is not None and ContractProbe.last.module is not None
    return cfg, record, ContractProbe.last


@pytest.fixture(scope="module")
def few_shot_run(tmp_path_factory: pytest.TempPathFactory):
    """The few-shot run of a method (made once, shared by this module's checks of that method)."""
    runs: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in runs:
            cfg, record, probe = run_method(tmp_path_factory.mktemp(f"contract_{name}") / "run", name,
                                            *protocol_data("few_shot"))
            model = probe.module
            after = {key: value.detach().clone() for key, value in model.state_dict().items()}
            images, _ = next(iter(model.trainer.datamodule.test_dataloader()[0]))
            model.eval()
            with torch.no_grad():
                logits = model(images, model.test_label_spaces[0])
            runs[name] = Run(cfg, record, probe, after, images, logits)
        return runs[name]

    return get


# ---------------------------------------------------------------- only the declared tensors train
@pytest.mark.parametrize("name", list(METHODS))
def test_only_the_declared_tensors_train(few_shot_run, name):
    spec = METHODS[name]
    run = few_shot_run(name)
    model = run.model
    trainable = set(model.trainable_parameter_names())
    if spec.fit == "none":
        assert not trainable and not model.trains and run.record["cost"]["train_steps"] == 0
        return
    kept = model.checkpoint_state_names()
    assert kept, f"{name} is registered with fit={spec.fit!r} but its checkpoint holds nothing"
    assert trainable <= kept
    assert run.probe.before, f"{name}: the run never started training"
    assert run.probe.grads <= trainable, f"gradients outside the trainable set: {run.probe.grads - trainable}"
    if spec.fit == "gradient":
        assert trainable, f"{name} is registered with fit='gradient' but declares nothing trainable"
        assert run.record["cost"]["train_steps"] == 1
        unreached = trainable - run.probe.grads
        assert not unreached, f"declared trainable, never reached by backward: {unreached}"
        assert run.probe.nonzero_grads, "the step's gradients are all zero"
    assert any(not torch.equal(run.probe.before[key], run.after[key]) for key in kept), "training changed nothing"
    assert any(key.startswith("clip.") for key in run.probe.before)
    changed = [key for key, value in run.probe.before.items() if key not in kept
               and not (key in run.after and torch.equal(value, run.after[key]))]
    assert not changed, f"tensors a checkpoint does not hold changed in training: {changed}"


# ---------------------------------------------------------------- the checkpoint round trip
@pytest.mark.parametrize("name", list(METHODS))
def test_the_checkpoint_holds_the_declared_state_and_round_trips(few_shot_run, name):
    run = few_shot_run(name)
    checkpoint = read_checkpoint(run.record["checkpoint"])
    assert set(checkpoint["state_dict"]) == run.model.checkpoint_state_names()
    assert checkpoint["vlm_adapt"]["method"] == name
    assert checkpoint["vlm_adapt"]["backbone"] == {
        "model_name": "vlm-tiny", "pretrained": None, "quick_gelu": True, "init_seed": run.cfg.seed}
    fresh = load_method(checkpoint, None, run.model.test_label_spaces)  # as `vlm-adapt eval` rebuilds it
    assert fresh.checkpoint_state_names() == set(checkpoint["state_dict"])
    fresh.eval()
    with torch.no_grad():
        logits = fresh(run.images, fresh.test_label_spaces[0])
    torch.testing.assert_close(logits, run.logits, rtol=1e-6, atol=1e-6)
    if METHODS[name].trains:  # what it restores matters: the same tensors as training found them score otherwise
        untrained = {key: run.probe.before[key] for key in checkpoint["state_dict"]}
        untrained = load_method(checkpoint | {"state_dict": untrained}, None, run.model.test_label_spaces)
        untrained.eval()
        with torch.no_grad():
            assert not torch.equal(untrained(run.images, untrained.test_label_spaces[0]), run.logits)


# ---------------------------------------------------------------- the loss falls
@pytest.mark.parametrize("name", [name for name, spec in METHODS.items() if spec.fit == "gradient"])
def test_the_loss_falls_on_a_fixed_batch(few_shot_run, monkeypatch, name):
    run = few_shot_run(name)
    model = run.model  # after its run: its caches built, its trainer and datamodule attached
    optimizer = hydra.utils.get_class(run.cfg.method.module.optimizer._target_)
    if optimizer.__name__ not in FAMILY_OPTIMIZER:
        pytest.fail(f"{name} trains with {optimizer.__name__}: give that family a learning rate in FAMILY_OPTIMIZER")
    monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)  # logging is the loop's, and this runs outside it
    model.train()
    batch = next(iter(model.trainer.datamodule.train_dataloader()))
    assert_loss_falls(model, batch, lambda params: optimizer(params, **FAMILY_OPTIMIZER[optimizer.__name__]),
                      steps=LOSS_STEPS, factor=LOSS_FACTOR)


# ---------------------------------------------------------------- every protocol it claims
def protocol_cases() -> list[Any]:
    """(method, protocol, 1000-class targets) for every protocol of every task each method registers,
    few-shot aside (the runs above): fast with small targets, and slow with 1000-class targets for the
    protocols that have targets."""
    cases = []
    for task in TASKS:
        for protocol in [p for p in PROTOCOLS[task] if p != "few_shot"]:
            targets = protocol in ("cross_dataset", "domain_generalization")
            for name in methods_supporting(task):
                # fast: base-to-new and retrieval; the target protocols run the same loop on other test sets
                marks = [pytest.mark.slow] if targets else []
                cases.append(pytest.param(name, protocol, False, marks=marks, id=f"{name}-{protocol}"))
                if targets:
                    cases.append(pytest.param(name, protocol, True, marks=pytest.mark.slow,
                                              id=f"{name}-{protocol}-1000_classes"))
    return cases


@pytest.mark.parametrize("name, protocol, thousand_classes", protocol_cases())
def test_runs_every_protocol_it_claims(tmp_path, variants_root, name, protocol, thousand_classes):
    _, record, probe = run_method(tmp_path / "run", name, *protocol_data(protocol, variants_root, thousand_classes))
    assert record["protocol"] == protocol
    assert_reports_its_test_sets(record, probe.module)


@pytest.mark.parametrize("name", [name for name, spec in METHODS.items() if spec.supports(CLASSIFICATION)])
def test_the_few_shot_run_reports_every_test_set_it_scores(few_shot_run, name):
    run = few_shot_run(name)
    assert (run.record["protocol"], run.record["dataset"]) == ("few_shot", "imagenette")
    assert_reports_its_test_sets(run.record, run.model)


@pytest.mark.parametrize("name, task", [(name, task) for name, spec in METHODS.items() for task in TASKS
                                        if not spec.supports(task)])
def test_a_task_it_does_not_register_is_refused_clearly(tmp_path, variants_root, name, task):
    supporting = ", ".join(f"method={m}" for m in methods_supporting(task))
    for protocol in PROTOCOLS[task]:
        with pytest.raises(ConfigError, match=rf"method={name} .*protocol={protocol} needs one of {supporting}"):
            train(compose_cfg(tmp_path / protocol, [*FAST, *tiny_method_overrides(name),
                                                    *protocol_data(protocol, variants_root)]))
