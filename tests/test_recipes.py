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


@pytest.mark.parametrize("data, shots, epochs", [("dtd", 1, 50), ("dtd", 2, 100), ("dtd", 4, 100), ("dtd", 8, 200),
                                                  ("dtd", 16, 200), ("imagenet", 1, 50), ("imagenet", 16, 50)])
def test_coop_few_shot_epochs_follow_shots_and_imagenet_trains_50(data, shots, epochs, tmp_path):
    cfg = compose(tmp_path, "experiment=coop_few_shot", f"data={data}", f"protocol.shots={shots}")
    assert cfg.trainer.max_epochs == epochs
    module = cfg.method.module
    assert (module.n_ctx, module.ctx_init, module.class_token_position, module.csc) == (16, None, "end", False)
    assert (cfg.method.batch_size, module.optimizer.lr, module.scheduler.warmup_lr) == (32, 2e-3, 1e-5)


@pytest.mark.parametrize("experiment, data, reg_weight, epochs", [
    ("clipfit_base2new", "dtd", 8.0, 100), ("clipfit_base2new", "food101", 8.0, 10),
    ("clipfit_few_shot", "dtd", 8.0, 100), ("clipfit_few_shot", "eurosat", 2.0, 100),
    ("clipfit_few_shot", "imagenet", 2.0, 10),
])
def test_clipfit_recipes_and_the_references_dtd_template(experiment, data, reg_weight, epochs, tmp_path):
    cfg = compose(tmp_path, f"experiment={experiment}", f"data={data}")
    module = cfg.method.module
    assert (module.reg_weight, cfg.trainer.max_epochs, cfg.method.batch_size) == (reg_weight, epochs, 32)
    assert (module.optimizer.lr, module.scheduler.name, module.scheduler.warmup_lr) == (2e-3, "dassl_cosine", 1e-5)
    own = templates_for({"name": data, "templates": list(cfg.data.templates)}, cfg.prompt_templates)
    assert own == (("a photo of a {}, a type of texture.",) if data == "dtd" else tuple(cfg.data.templates))


@pytest.mark.parametrize("data, epochs", [("dtd", 200), ("imagenet", 50)])
def test_coop_base2new_is_the_cocoop_papers_coop_baseline(data, epochs, tmp_path):
    cfg = compose(tmp_path, "experiment=coop_base2new", f"data={data}")
    module = cfg.method.module
    assert (cfg.protocol.name, cfg.protocol.shots, cfg.trainer.max_epochs) == ("base2new", 16, epochs)
    assert (module.ctx_init, module.ctx_init_length, module.class_token_position, module.csc) == (
        "a photo of a", "words", "end", False)
    model = build_method(compose(tmp_path, "experiment=coop_base2new", "backbone=tiny").method.module,
                         load_backbone("vlm-tiny", None))
    assert model.ctx.shape[0] == 4


def test_unipt_retrieval_is_the_references_clip4clip_recipe(tmp_path):
    cfg = compose(tmp_path, "experiment=unipt_retrieval")
    module = to_plain(cfg.method.module)
    assert (module["factor"], module["width_from"], module["scheduler_interval"]) == (1, "embed_dim", "step")
    assert module["optimizer"] | {} == {"_target_": "torch.optim.AdamW", "lr": 1e-4, "eps": 1e-6,
                                        "weight_decay": 0.2, "betas": [0.9, 0.98]}
    assert module["scheduler"]["name"] == "clip4clip" and module["scheduler"]["warmup_proportion"] == 0.1
    assert (cfg.method.batch_size, cfg.trainer.max_epochs, cfg.trainer.gradient_clip_val) == (128, 5, 1.0)
    tiny = compose(tmp_path, "experiment=unipt_retrieval", "backbone=tiny")
    model = build_method(tiny.method.module, load_backbone("vlm-tiny", None))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = {g["name"]: g for g in build_param_groups(named, None, module["no_decay_names"])}
    assert {id(p) for p in groups["default/no_decay"]["params"]} == {id(p) for n, p in named if "bias" in n}
    assert model.image_parallel.token_down[0][1].out_features == 64  # embed_dim / 1 on the tiny model
