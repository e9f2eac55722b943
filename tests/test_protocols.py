"""Cross-dataset and domain-generalization protocols, the ImageNet-variant layouts, and the paper sweeps."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA, compose_cfg
from hydra import compose, initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from method_contract import build_imagenet_variants
from omegaconf import OmegaConf

from vlm_adapt.backbones.towers import CLIPTowers
from vlm_adapt.build import build_datamodule
from vlm_adapt.errors import ConfigError, DatasetNotFoundError
from vlm_adapt.train import train

COOP_TARGETS = ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
                "sun397", "dtd", "eurosat", "ucf101"]
DG_TARGETS = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
DROP_COOP_TARGETS = [f"~data@protocol.targets.{name}" for name in COOP_TARGETS]
IMAGENET_CLASSES = [line.split(" ", 1) for line in (SHARED_DATA / "imagenet-samples" / "classnames.txt")
                    .read_text().splitlines() if line.strip()]


def test_cross_dataset_trains_on_imagenet_and_targets_the_ten_coop_datasets(make_cfg):
    cfg = make_cfg("protocol=cross_dataset")
    assert cfg.data.name == "imagenet"
    assert list(cfg.protocol.targets) == COOP_TARGETS
    for name, target in cfg.protocol.targets.items():  # each target is its conf/data/<name>.yaml
        assert target == make_cfg(f"data={name}", output=f"data_{name}").data
    assert (cfg.protocol.name, cfg.protocol.train_subset, list(cfg.protocol.test_subsets)) == (
        "cross_dataset", "all", ["all"])


def test_target_list_and_source_are_overridable(make_cfg):
    cfg = make_cfg("protocol=cross_dataset", "data=imagenette", "~data@protocol.targets.eurosat",
                   "+data@protocol.targets.imagenet_sketch=imagenet_sketch")
    assert cfg.data.name == "imagenette"
    assert "eurosat" not in cfg.protocol.targets
    assert cfg.protocol.targets.imagenet_sketch.image_dir == "images"
    assert len(cfg.protocol.targets) == 10


def test_cross_dataset_run_reports_every_target_and_chunks_1000_class_text(make_cfg, tmp_path, monkeypatch):
    """Train CoOp on imagenette; test on imagenette and the 1000-class imagenet_samples in one run."""
    batch_sizes: list[int] = []
    text_head = CLIPTowers.text_head

    def recording_text_head(self, x, eot_index):
        batch_sizes.append(x.shape[0])
        return text_head(self, x, eot_index)

    monkeypatch.setattr(CLIPTowers, "text_head", recording_text_head)
    cfg = make_cfg("method=coop", "protocol=cross_dataset", "data=imagenette", *DROP_COOP_TARGETS,
                   "+data@protocol.targets.imagenet_samples=imagenet_samples", "trainer.limit_test_batches=1")
    train(cfg)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "completed" and record["protocol"] == "cross_dataset"
    assert record["targets"] == ["imagenet_samples"]
    for name in ("imagenette", "imagenet_samples"):
        assert 0.0 <= record["metrics"][f"test/{name}/acc"] <= 100.0
    chunk = cfg.method.module.get("text_chunk_size", 256)
    assert max(batch_sizes) <= chunk < 1000
    assert sum(batch_sizes) >= 1000  # the 1000 ImageNet prompts went through, chunk by chunk


def test_a_target_named_like_the_source_is_refused_before_training(make_cfg):
    cfg = make_cfg("protocol=cross_dataset", "data=imagenette", *DROP_COOP_TARGETS,
                   "+data@protocol.targets.imagenette=imagenette")
    with pytest.raises(ConfigError, match=r"\['imagenette'\] appear twice.*~data@protocol.targets"):
        build_datamodule(cfg)


@pytest.fixture
def imagenet_variants(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    """The four ImageNet variants in their usual (CoOp DATASETS.md) layouts, built from imagenet-samples."""
    root = tmp_path / "data"
    return root, build_imagenet_variants(root)


def test_domain_generalization_reads_the_usual_variant_layouts(make_cfg, imagenet_variants):
    root, subsets = imagenet_variants
    cfg = make_cfg("protocol=domain_generalization", "data=imagenette", f"paths.data_dir={root}")
    assert list(cfg.protocol.targets) == DG_TARGETS
    datamodule = build_datamodule(cfg)
    spaces = {space.name: space for space in datamodule.test_label_spaces}
    assert list(spaces) == ["imagenette", *DG_TARGETS]
    names = dict(IMAGENET_CLASSES)
    for name, wnids in subsets.items():  # A and R: only their classes, ImageNet names, ImageNet order
        expected = sorted(wnids, key=[w for w, _ in IMAGENET_CLASSES].index)
        assert spaces[name].classnames == tuple(names[w] for w in expected)
    assert spaces["imagenet_v2"].num_classes == spaces["imagenet_sketch"].num_classes == 1000
    for space, items, _ in datamodule.test_sets:
        if space.name in ("imagenet_v2", "imagenet_a", "imagenet_r"):
            for item in items:  # every image carries the label of the class its file belongs to
                wnid = Path(item.path).stem
                assert space.classnames[item.label] == names[wnid] == item.classname
    v2_items = next(items for space, items, _ in datamodule.test_sets if space.name == "imagenet_v2")
    assert len(v2_items) == 1000


def test_variant_without_any_class_folder_names_the_layout(make_cfg, imagenet_variants):
    root, _ = imagenet_variants
    (root / "imagenet-adversarial" / "empty").mkdir()
    cfg = make_cfg("protocol=domain_generalization", "data=imagenette", f"paths.data_dir={root}",
                   "protocol.targets.imagenet_a.image_dir=empty")
    with pytest.raises(DatasetNotFoundError, match="no class of .*classnames.txt has a folder"):
        build_datamodule(cfg)


# ---------------------------------------------------------------- paper sweeps
PAPER_SWEEPS = {
    # experiment: (jobs for one method, the values swept)
    "paper_base2new": (33, {"data": 11, "seed": 3}),
    "paper_few_shot": (165, {"data": 11, "protocol.shots": 5, "seed": 3}),
    "paper_cross_dataset": (3, {"seed": 3}),
    "paper_domain_generalization": (3, {"seed": 3}),
}


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The job override lists Hydra's basic sweeper makes of `vlm-adapt train -m <overrides>`:
    the experiment's hydra.sweeper.params first, the command line's overrides winning over them."""
    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="vlm_adapt.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=fixed, return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + overrides
    batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
    return list(itertools.chain.from_iterable(batches))


@pytest.mark.parametrize("experiment", list(PAPER_SWEEPS))
def test_paper_sweep_expands_to_the_table_and_every_job_composes(experiment, tmp_path):
    jobs_per_method, swept = PAPER_SWEEPS[experiment]
    jobs = expand_sweep([f"experiment={experiment}", "method=zero_shot,coop"])
    assert len(jobs) == 2 * jobs_per_method
    for key, count in swept.items():
        assert len({job_value(job, key) for job in jobs}) == count
    protocol = experiment.removeprefix("paper_")
    first_of_each_dataset = {job_value(job, "data"): job for job in reversed(jobs)}.values()
    for job in first_of_each_dataset:
        cfg = compose_cfg(tmp_path, job)
        assert cfg.protocol.name == protocol and cfg.task_name == experiment
        assert cfg.protocol.shots == int(job_value(job, "protocol.shots") or 16)
        if protocol in ("cross_dataset", "domain_generalization"):
            assert cfg.data.name == "imagenet"
            assert list(cfg.protocol.targets) == (COOP_TARGETS if protocol == "cross_dataset" else DG_TARGETS)


def test_paper_sweep_takes_a_method_recipe_and_narrowing_overrides(tmp_path):
    overrides = ["experiment=paper_base2new", "+experiment@_global_=clipfit_base2new", "data=dtd,eurosat", "seed=1"]
    jobs = expand_sweep(overrides)
    assert len(jobs) == 2
    cfg = compose_cfg(tmp_path, jobs[0])
    assert (cfg.method.name, cfg.protocol.name, cfg.protocol.shots, cfg.data.name) == ("clipfit", "base2new", 16, "dtd")
    assert cfg.method.module.reg_weight == 8.0


def base2new_recipes() -> set[str]:
    """Every method's base-to-new paper recipe: conf/experiment/<name>_base2new.yaml, the sweeps left out."""
    folder = REPO / "conf" / "experiment"
    return {p.stem for p in folder.glob("*_base2new.yaml") if not p.stem.startswith("paper_")}


def test_the_comparison_table_sweeps_every_base2new_recipe_over_11_datasets_and_3_seeds(tmp_path):
    recipes = base2new_recipes()
    jobs = expand_sweep(["experiment=paper_comparison_base2new"])
    assert len(jobs) == len(recipes) * 11 * 3
    assert {job_value(job, "+experiment@_global_") for job in jobs} == recipes
    assert len({job_value(job, "data") for job in jobs}) == 11 and {job_value(job, "seed") for job in jobs} == {
        "1", "2", "3"}
    assert len({tuple(sorted(job)) for job in jobs}) == len(jobs)
    for job in {job_value(job, "+experiment@_global_"): job for job in jobs}.values():  # one job of each recipe
        cfg = compose_cfg(tmp_path, job)
        recipe = job_value(job, "+experiment@_global_")
        method = {"ft_skip_tuning": "ft"}.get(recipe.removesuffix("_base2new"), recipe.removesuffix("_base2new"))
        assert (cfg.task_name, cfg.method.name) == (recipe, method)
        assert (cfg.protocol.name, cfg.protocol.shots) == ("base2new", 16)


def test_the_comparison_table_narrows_to_chosen_recipes(tmp_path):
    jobs = expand_sweep(["experiment=paper_comparison_base2new", "+experiment@_global_=coop_base2new,maple_base2new",
                         "data=dtd", "seed=1"])
    assert sorted(job_value(job, "+experiment@_global_") for job in jobs) == ["coop_base2new", "maple_base2new"]
    assert compose_cfg(tmp_path, jobs[-1]).method.module.prompt_depth == 9


def job_value(job: list[str], key: str) -> str | None:
    values = [override.split("=", 1)[1] for override in job if override.split("=", 1)[0] == key]
    return values[-1] if values else None
