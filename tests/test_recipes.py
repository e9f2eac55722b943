"""The paper experiments compose to the reference implementations' recipes (values from their configs)."""

import pytest
import torch
from conftest import compose_cfg

from vlm_adapt.backbones import load_backbone
from vlm_adapt.build import build_method, to_plain
from vlm_adapt.data.templates import templates_for
from vlm_adapt.methods.param_groups import build_param_groups
from vlm_adapt.methods.schedulers import build_scheduler

# Koorye/SkipTuning configs/trainers/SkipTuning/*.yaml and trainers/skip_tuning.py (MAX_EPOCH / 4 rule)
SKIP_TUNING = {
    # experiment: (text lr, image lr, warm-up epochs, warm-up lr, epochs on DTD, epochs on ImageNet/SUN/Food)
    "skip_tuning_base2new": (2e-5, 5e-6, 1, 1e-6, 20, 5),
    "skip_tuning_cross_dataset": (1e-5, 1e-6, 1, 1e-8, 20, 5),
    "skip_tuning_domain_generalization": (1e-5, 1e-6, 1, 1e-8, 20, 5),
    "skip_tuning_few_shot": (1e-5, 1e-5, 0, None, 40, 10),
}


def compose(tmp_path, *overrides):
    return compose_cfg(tmp_path, list(overrides))


@pytest.mark.parametrize("experiment", list(SKIP_TUNING))
def test_skip_tuning_recipes(experiment, tmp_path):
    text_lr, image_lr, warmup, warmup_lr, epochs, short_epochs = SKIP_TUNING[experiment]
    for data, expected_epochs in (("dtd", epochs), ("sun397", short_epochs), ("imagenet", short_epochs)):
        cfg = compose(tmp_path, f"experiment={experiment}", f"data={data}")
        if experiment.endswith(("cross_dataset", "domain_generalization")) and data != "imagenet":
            continue  # the source is ImageNet in these protocols
        assert cfg.trainer.max_epochs == expected_epochs, (experiment, data)
    cfg = compose(tmp_path, f"experiment={experiment}")
    module = cfg.method.module
    assert (cfg.method.batch_size, cfg.method.drop_last, cfg.protocol.shots) == (4, True, 16)
    assert module.optimizer.lr == text_lr and module.optimizer.momentum == 0.9
    assert module.optimizer.weight_decay == 5e-4
    groups = to_plain(module.get("param_groups")) or {}
    assert (groups["image_tower"]["lr"] if groups else text_lr) == image_lr
    assert module.scheduler.name == "dassl_cosine" and module.scheduler.warmup == warmup
    if warmup:
        assert module.scheduler.warmup_lr == warmup_lr
    assert module.keep_mask == "once" and module.start_layer == 6
    assert cfg.prompt_templates == "skip_tuning"
    expected_protocol = experiment.removeprefix("skip_tuning_")
    assert cfg.protocol.name == {"base2new": "base2new", "few_shot": "few_shot"}.get(expected_protocol,
                                                                                       expected_protocol)


def test_skip_tuning_image_tower_trains_at_its_own_rate_and_warms_up_with_the_text_side(tmp_path):
    cfg = compose(tmp_path, "experiment=skip_tuning_base2new", "backbone=tiny", "method.module.start_layer=2")
    model = build_method(cfg.method.module, load_backbone(**to_plain(cfg.backbone)))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(build_param_groups(named, to_plain(cfg.method.module.param_groups)), lr=2e-5)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert {n for n, _ in named if n.startswith("clip.visual.")} == {
        n for n, p in named if any(p is q for q in by_name["image_tower"]["params"])}
    scheduler = build_scheduler(optimizer, to_plain(cfg.method.module.scheduler), 20)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-6, 1e-6]  # Dassl: one absolute warm-up rate
    optimizer.step()
    scheduler.step()
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {"default": 2e-5, "image_tower": 5e-6}


def test_skip_tuning_templates_reach_the_source_and_every_target(tmp_path):
    cfg = compose(tmp_path, "experiment=skip_tuning_domain_generalization")
    targets = {name: templates_for({"name": name, "templates": list(t.templates)}, cfg.prompt_templates)
               for name, t in cfg.protocol.targets.items()}
    assert targets == {"imagenet_v2": ("a photo of a {}.",), "imagenet_sketch": ("a sketch of a {}.",),
                       "imagenet_a": ("a bad photo of a {}.",), "imagenet_r": ("a rendition of a {}.",)}
    dtd = compose(tmp_path, "experiment=skip_tuning_base2new", "data=dtd")
    dtd_cfg = {"name": "dtd", "templates": list(dtd.data.templates)}
    assert templates_for(dtd_cfg, dtd.prompt_templates) == ("itap of a {}.",)
    assert templates_for(dtd_cfg, "dataset") == ("{} texture.",)  # CoOp's, the data config's


def test_skip_tuning_recipe_on_the_paper_domain_generalization_sweep_stays_that_protocol(tmp_path):
    cfg = compose(tmp_path, "experiment=paper_domain_generalization",
                  "+experiment@_global_=skip_tuning_domain_generalization")
    assert cfg.protocol.name == "domain_generalization"
    assert list(cfg.protocol.targets) == ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert cfg.method.name == "skip_tuning" and cfg.trainer.max_epochs == 5


@pytest.mark.parametrize("experiment, epochs, protocol", [
    ("ft_skip_tuning_base2new", 10, "base2new"), ("ft_skip_tuning_cross_dataset", 4, "cross_dataset"),
])
def test_skip_tuning_papers_ft_baseline(experiment, epochs, protocol, tmp_path):
    cfg = compose(tmp_path, f"experiment={experiment}", "data=imagenet")
    assert (cfg.method.name, cfg.protocol.name, cfg.trainer.max_epochs) == ("ft", protocol, epochs)
    assert (cfg.method.batch_size, cfg.method.module.optimizer.lr, cfg.method.module.scheduler.warmup) == (4, 1e-5, 0)
    tiny = compose(tmp_path, f"experiment={experiment}", "backbone=tiny")
    model = build_method(tiny.method.module, load_backbone(**to_plain(tiny.backbone)))
    frozen = {n for n, p in model.clip.named_parameters() if not p.requires_grad}
    assert frozen == {"token_embedding.weight", "positional_embedding", "visual.class_embedding",
                      "visual.positional_embedding", "visual.conv1.weight", "visual.ln_pre.weight",
                      "visual.ln_pre.bias", "logit_scale"}


@pytest.mark.parametrize("method", ["coop", "clipfit", "skip_tuning", "ft"])
def test_dassl_methods_use_dassls_schedule_and_drop_the_last_batch(method, tmp_path):
    cfg = compose(tmp_path, f"method={method}")
    assert cfg.method.module.scheduler.name == "dassl_cosine" and cfg.method.drop_last is True
