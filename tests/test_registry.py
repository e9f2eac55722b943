"""The method registry: every method is registered once, with a config, a README row and its capabilities."""

from __future__ import annotations

import re

import pytest
from conftest import REPO, tiny_method_overrides
from omegaconf import OmegaConf

from vlm_adapt.bench import benched_methods
from vlm_adapt.build import method_class
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.coop import CoOp
from vlm_adapt.methods.registry import (
    RETRIEVAL,
    CacheSpec,
    method_spec,
    methods_supporting,
    register_method,
    registered_methods,
)


class UnregisteredCoOp(CoOp):
    """A subclass that did not register a name of its own."""


CONFIGS = {p.stem: p for p in sorted((REPO / "conf" / "method").glob("*.yaml"))}


def config_target(name: str) -> str:
    """The `module._target_` of a method config, following its defaults (variants such as zero_shot_ensemble)."""
    cfg = OmegaConf.load(CONFIGS[name])
    target = OmegaConf.select(cfg, "module._target_")
    if target is None:
        parent = next(d for d in cfg.defaults if isinstance(d, str) and d != "_self_")
        return config_target(parent)
    return target


def test_every_method_config_builds_a_registered_method():
    registered = {spec.cls for spec in registered_methods().values()}
    for name in CONFIGS:
        assert method_class(config_target(name)) in registered, name


def test_every_registered_method_has_its_own_config():
    for name, spec in registered_methods().items():
        assert name in CONFIGS, f"conf/method/{name}.yaml missing"
        assert method_class(config_target(name)) is spec.cls
        assert OmegaConf.load(CONFIGS[name]).name == name


def test_the_readme_method_table_lists_exactly_the_registered_methods():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Methods"):].split("\n\n")[1]
    rows = re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE)
    assert sorted(rows) == list(registered_methods())


def test_capabilities_are_read_from_the_registry():
    assert methods_supporting(RETRIEVAL) == ["ft", "unipt", "zero_shot"]
    assert not method_spec("zero_shot").trains and method_spec("coop").trains
    assert [c.refresh for c in method_spec("skip_tuning").caches] == ["epoch"]
    assert benched_methods(None) == [n for n, s in registered_methods().items() if s.trains]
    assert benched_methods(["coop"]) == ["coop"]


def test_an_unknown_name_lists_the_registered_methods():
    with pytest.raises(ConfigError) as error:
        method_spec("nope")
    assert str(error.value) == f"unknown method 'nope'; registered methods: {', '.join(registered_methods())}"


def test_a_name_is_registered_once_and_a_subclass_must_register_its_own():
    with pytest.raises(ValueError, match="'coop' is taken by vlm_adapt.methods.coop.CoOp"):
        register_method("coop")(type("OtherCoOp", (CLIPMethod,), {}))
    with pytest.raises(ValueError, match="refreshed once or every epoch"):
        register_method("x", caches=(CacheSpec("tokens", "once", augmented=True),))
    with pytest.raises(ConfigError, match="not a registered method"):
        method_class(f"{__name__}.UnregisteredCoOp")


def test_retrieval_with_a_classification_only_method_lists_the_retrieval_methods(make_cfg):
    from vlm_adapt.train import train

    with pytest.raises(ConfigError, match="protocol=retrieval needs one of method=ft, method=unipt, method=zero_shot"):
        train(make_cfg("method=coop", "protocol=retrieval", "data=coco_captions"))


def test_the_loop_exists_once():
    """No method defines a Lightning step: each supplies parts to the task's steps (methods/tasks.py)."""
    steps = {"training_step", "validation_step", "test_step", "on_test_epoch_end"}
    for name, spec in registered_methods().items():
        overridden = [cls.__name__ + "." + step for cls in spec.cls.__mro__ if cls is not CLIPMethod
                      and issubclass(cls, CLIPMethod) for step in steps if step in vars(cls)]
        assert not overridden, f"{name}: {overridden}"
    base = (REPO / "vlm_adapt" / "methods" / "base.py").read_text()
    assert not [name for name in registered_methods() if re.search(rf"\b{name}\b", base)]


def test_the_task_comes_from_the_datamodule(make_cfg):
    from vlm_adapt.build import build_backbone, build_datamodule, build_method
    from vlm_adapt.methods.tasks import ClassificationTask, RetrievalTask

    for overrides, task in ((["method=ft"], ClassificationTask),
                            (["method=ft", "protocol=retrieval", "data=coco_captions"], RetrievalTask)):
        cfg = make_cfg(*overrides)
        model = build_method(cfg.method.module, build_backbone(cfg))
        model.trainer = type("T", (), {"datamodule": build_datamodule(cfg)})()
        model.setup("fit")
        assert type(model.task) is task and model.retrieval == (task is RetrievalTask)


@pytest.mark.parametrize("name", [n for n, s in registered_methods().items() if s.trains])
def test_fitting_a_method_leaves_the_datamodule_as_it_was(make_cfg, name):
    """A method says what its batches hold (`training_inputs`); it never sets anything on the datamodule."""
    import lightning as L

    from vlm_adapt.build import build_backbone, build_datamodule, build_method

    cfg = make_cfg(*tiny_method_overrides(name))
    datamodule = build_datamodule(cfg)
    backbone = build_backbone(cfg)
    datamodule.set_preprocessing(backbone.model.visual.preprocess_cfg)
    model = build_method(cfg.method.module, backbone)
    model.attach_label_spaces(datamodule.train_label_space, datamodule.test_label_spaces)
    before = {key: value for key, value in vars(datamodule).items() if key != "trainer"}
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, limit_val_batches=0).fit(model, datamodule=datamodule)
    after = {key: value for key, value in vars(datamodule).items() if key != "trainer"}
    assert after.keys() == before.keys() and all(after[key] is before[key] for key in before)
