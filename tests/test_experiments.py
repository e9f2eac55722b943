"""Every experiment config (conf/experiment/*.yaml, globbed: a new one is covered without writing a test)
composes to what its file says and runs: `vlm-adapt train experiment=<name>` on the tiny backbone, the
shipped images and `debug=fast` (one batch of each stage) completes.

What the file sets is read from the file itself: the group options its defaults pick (method, protocol,
data, backbone) and every value of its body (the recipe: optimizer, schedule, batch size, epochs, shots,
templates, ...), unresolved, so an interpolation such as a per-dataset epoch table is compared as written;
the whole composed config must also resolve. The run keeps every recipe value but the ones the tiny run
overrides (backbone, loader, shots, data, options the tiny backbone cannot hold).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, compose_cfg, tiny_method_overrides
from method_contract import PROBE, ContractProbe, assert_reports_its_test_sets, build_imagenet_variants, protocol_data
from omegaconf import DictConfig, OmegaConf

from vlm_adapt.train import train

CONF = REPO / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
NOT_RECIPE = ("defaults", "hydra")  # the defaults list is checked as group options; sweeps: tests/test_protocols.py

# The tiny CPU run: one batch of each stage (debug=fast) with one shot a class and small eval batches; the
# recipe's batch size and epochs stay (fast_dev_run stops after one batch whatever they are).
TINY_RUN = ["backbone=tiny", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "loader.num_workers=0",
            "loader.eval_batch_size=8", "debug=fast"]


@pytest.fixture(scope="session")
def variants_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet_variants")
    build_imagenet_variants(root)
    return root


def experiment_file(name: str) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{name}.yaml"), resolve=False)


def group_options(experiment: dict[str, Any]) -> dict[str, str]:
    """{group: option} of the experiment's `- override /<group>: <option>` defaults."""
    options = {}
    for entry in experiment.get("defaults") or []:
        if isinstance(entry, dict):
            for key, option in entry.items():
                if key.startswith("override /") and option is not None:
                    options[key.removeprefix("override /")] = option
    return options


def leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(path, value) of every leaf of a config tree; lists are leaves."""
    found = []
    for key, value in tree.items():
        path = (*prefix, str(key))
        found += leaves(value, path) if isinstance(value, dict) and value else [(path, value)]
    return found


def raw(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value at `path` of a composed config's tree as written (interpolations unresolved)."""
    node: Any = tree
    for key in path:
        assert isinstance(node, dict) and key in node, f"{'.'.join(path)} did not reach the composed config"
        node = node[key]
    return node


def expected_values(name: str) -> list[tuple[tuple[str, ...], Any]]:
    """What `experiment=<name>` must give: its body's leaves, and the top-level values of each group option it
    picks (conf/<group>/<option>.yaml) that the body does not set itself."""
    experiment = experiment_file(name)
    body = {key: value for key, value in experiment.items() if key not in NOT_RECIPE}
    expected = leaves(body)
    set_by_body = {path for path, _ in expected}
    for group, option in group_options(experiment).items():
        option_file = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"), resolve=False)
        expected += [((group, key), value) for key, value in option_file.items() if key != "defaults"
                     and not isinstance(value, dict) and (group, key) not in set_by_body]
    return expected


def assert_composed_as_written(cfg: DictConfig, name: str, overridden: tuple[str, ...] = ()) -> None:
    """Every expected value of the experiment reached `cfg`, but those under the dotted `overridden` paths."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    for path, value in expected_values(name):
        dotted = ".".join(path)
        if any(dotted == o or dotted.startswith(f"{o}.") for o in overridden):
            continue
        assert raw(tree, path) == value, f"experiment={name}: {dotted}"
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation of the tree resolves
    method, trainer = resolved["method"], resolved["trainer"]
    if "max_epochs" in method:  # the recipe's length reaches the trainer
        assert trainer["max_epochs"] == method["max_epochs"]
    if "max_steps" in method:
        assert trainer["max_steps"] == method["max_steps"]


def run_overrides(cfg: DictConfig, variants_root: Path) -> list[str]:
    """The tiny run of a composed experiment: its protocol on the shipped images (tests/method_contract.py)."""
    protocol = cfg.protocol.name
    data = [o for o in protocol_data(protocol, variants_root) if not o.startswith("protocol=")]
    shots = [] if cfg.protocol.get("shots") is None else ["protocol.shots=1"]
    return [*TINY_RUN, *shots, *data, *tiny_method_overrides(cfg.method.name)[1:], *PROBE]


def overridden_paths(overrides: list[str]) -> tuple[str, ...]:
    """The config paths a list of overrides sets (a group override sets the whole group)."""
    paths = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        paths.append(key.split("@", 1)[1] if "@" in key else key)
    return tuple(paths)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_experiment_composes_as_its_file_says(tmp_path, name):
    assert_composed_as_written(compose_cfg(tmp_path, [f"experiment={name}"]), name)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_experiment_runs(tmp_path, variants_root, name):
    recipe = compose_cfg(tmp_path / "compose", [f"experiment={name}"])
    overrides = run_overrides(recipe, variants_root)
    cfg = compose_cfg(tmp_path / "run", [f"experiment={name}", *overrides])
    assert cfg.trainer.fast_dev_run
    assert (cfg.method.name, cfg.protocol.name) == (recipe.method.name, recipe.protocol.name)
    assert_composed_as_written(cfg, name, overridden_paths(overrides))
    ContractProbe.last = None
    train(cfg)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "completed", record.get("error")
    assert (record["method"], record["protocol"], record["task_name"]) == (
        recipe.method.name, recipe.protocol.name, recipe.task_name)
    assert_reports_its_test_sets(record, ContractProbe.last.module)
