"""TaskRes: only the C x D residual trains (C x 512 at ViT-B/16), at initialisation it is zero-shot CLIP, its
logits are the reference's exp(s) norm(f) norm(t0 + alpha x)^T with t0 the unnormalized template mean, a label
space of training classes takes their trained rows (the reference's ImageNet-V2/-Sketch/-A/-R transfer), any other
is zero-shot (or skipped), checkpoints round-trip, and the experiments carry the reference's recipe
(geekyutao/TaskRes)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA, compose_cfg
from method_contract import assert_loss_falls

from vlm_adapt.backbones import load_backbone
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.data.templates import templates_for
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.registry import method_spec
from vlm_adapt.methods.taskres import TaskRes
from vlm_adapt.methods.zero_shot import ZeroShot

TRAIN = LabelSpace("train", ("tench", "goldfish", "church", "parachute", "golf ball"), ("a photo of a {}.",))
TWO_TEMPLATES = ("a photo of a {}.", "itap of a {}.")
IMAGES = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def taskres(train: LabelSpace = TRAIN, test: tuple[LabelSpace, ...] = (), **kwargs) -> TaskRes:
    model = TaskRes(load_backbone("vlm-tiny", None, init_seed=1), **kwargs)
    model.attach_label_spaces(train, [train, *test])
    return model.eval()


def set_residual(model: TaskRes, seed: int = 1, std: float = 0.5) -> torch.Tensor:
    x = torch.randn(model.text_feature_residuals.shape, generator=torch.Generator().manual_seed(seed)) * std
    with torch.no_grad():
        model.text_feature_residuals.copy_(x)
    return x


def raw_text_features(model: TaskRes, space: LabelSpace) -> torch.Tensor:
    """(C, T, D) unnormalized text features of every class and template, through open_clip's own encode_text."""
    with torch.no_grad():
        features = model.clip.encode_text(model.tokenizer(space.prompts()))
    return features.view(space.num_classes, len(space.templates), -1)


def reference_logits(model: TaskRes, t0: torch.Tensor, residual: torch.Tensor, alpha: float) -> torch.Tensor:
    """The reference's CustomCLIP.forward: exp(logit_scale) * norm(f) @ norm(t0 + alpha x)^T."""
    with torch.no_grad():
        f = model.clip.encode_image(IMAGES)
        f = f / f.norm(dim=-1, keepdim=True)
        text = t0 + alpha * residual
        text = text / text.norm(dim=-1, keepdim=True)
        return model.clip.logit_scale.exp() * f @ text.t()


def scores(model, space: LabelSpace) -> torch.Tensor:
    with torch.no_grad():
        return model(IMAGES, space)


# ------------------------------------------------------------------ what trains


def test_only_the_zero_initialised_residual_trains_one_row_per_training_class():
    model = taskres()
    assert method_spec("taskres").cls is TaskRes and method_spec("taskres").tasks == ("classification",)
    assert model.trainable_parameter_names() == ["text_feature_residuals"]
    assert torch.equal(model.text_feature_residuals, torch.zeros(5, 64))
    assert not any(p.requires_grad for p in model.clip.parameters())  # logit_scale and both towers frozen
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == TRAIN.num_classes * 64


def test_vit_b16_trains_c_x_512_imagenet_512000():
    imagenet = tuple(line.split(" ", 1)[1] for line in
                     (SHARED_DATA / "imagenet-samples" / "classnames.txt").read_text().splitlines() if line.strip())
    model = TaskRes(load_backbone("ViT-B-16", None))
    model.attach_label_spaces(LabelSpace("imagenet", imagenet, ("a photo of a {}.",)), [])
    assert model.trainable_parameter_names() == ["text_feature_residuals"]
    assert model.text_feature_residuals.shape == (1000, model.clip.visual.output_dim) == (1000, 512)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1000 * 512 == 512_000


# ------------------------------------------------------------------ the classifier


def test_at_initialisation_the_logits_are_zero_shot_clips():
    model = taskres()
    zero_shot = ZeroShot(load_backbone("vlm-tiny", None, init_seed=1)).eval()
    zero_shot.attach_label_spaces(TRAIN, [TRAIN])
    torch.testing.assert_close(scores(model, TRAIN), scores(zero_shot, TRAIN), rtol=1e-6, atol=1e-5)


def test_logits_are_the_references_formula_for_a_nonzero_residual():
    train = LabelSpace("train", TRAIN.classnames, TWO_TEMPLATES)
    model = taskres(train, alpha=0.5)
    x = set_residual(model)
    t0 = raw_text_features(model, train).mean(dim=1)  # the reference averages the features unnormalized
    torch.testing.assert_close(model.base_text_features(train), t0, rtol=1e-5, atol=1e-5)
    expected = reference_logits(model, t0, x, 0.5)
    torch.testing.assert_close(scores(model, train), expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(expected, reference_logits(model, t0, x, 1.0), atol=1e-2)  # alpha scales x
    classifier = model.class_text_features(train)
    torch.testing.assert_close(classifier.norm(dim=-1), torch.ones(5))  # renormalised after the residual


def test_t0_averages_the_template_features_unnormalized_not_clips_normalized_ensemble():
    train = LabelSpace("train", TRAIN.classnames, TWO_TEMPLATES)
    model = taskres(train)
    raw = raw_text_features(model, train)
    assert not torch.allclose(raw[:, 0].norm(dim=-1), raw[:, 1].norm(dim=-1), rtol=1e-2)  # so the two differ
    clip_ensemble = F.normalize(F.normalize(raw, dim=-1).mean(dim=1), dim=-1)
    reference = F.normalize(raw.mean(dim=1), dim=-1)
    torch.testing.assert_close(model.class_text_features(train), reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(reference, clip_ensemble, atol=1e-4)


def test_templates_option_prompts_the_training_classes_t0_only():
    new = LabelSpace("new", ("gas pump", "chain saw"), ("a photo of a {}.",))
    model = taskres(test=(new,), templates=list(TWO_TEMPLATES))
    t0 = raw_text_features(model, LabelSpace("train", TRAIN.classnames, TWO_TEMPLATES)).mean(dim=1)
    torch.testing.assert_close(model.class_text_features(TRAIN), F.normalize(t0, dim=-1), rtol=1e-5, atol=1e-6)
    own = raw_text_features(model, new)[:, 0]  # untrained classes keep their own template
    torch.testing.assert_close(model.class_text_features(new), F.normalize(own, dim=-1), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ other label spaces


def test_a_label_space_of_training_classes_takes_their_trained_rows():
    # ImageNet-A/-R: a subset of the classes in its own order; ImageNet-V2/-Sketch: the same classes. The reference
    # loads the ImageNet checkpoint's base_text_features and residuals, t0's templates included.
    subset = LabelSpace("imagenet_a", ("golf ball", "goldfish", "church"), ("a bad photo of a {}.",))
    same = LabelSpace("imagenet_v2", TRAIN.classnames, ("a sketch of a {}.",))
    model = taskres(test=(subset, same), alpha=0.5)
    x = set_residual(model)
    t0 = raw_text_features(model, TRAIN).mean(dim=1)
    trained = reference_logits(model, t0, x, 0.5)
    assert model.training_rows(subset) == [4, 1, 2] and model.supports_label_space(subset)
    torch.testing.assert_close(scores(model, subset), trained[:, [4, 1, 2]], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(scores(model, same), trained, rtol=1e-5, atol=1e-4)


def test_a_label_space_with_untrained_classes_is_zero_shot_clip_or_skipped():
    new = LabelSpace("new", ("gas pump", "chain saw"), ("a photo of a {}, a type of tool.",))
    mixed = LabelSpace("mixed", ("gas pump", "tench"), ("a photo of a {}.",))  # one class without a residual
    model = taskres(test=(new, mixed))
    set_residual(model)
    zero_shot = ZeroShot(load_backbone("vlm-tiny", None, init_seed=1)).eval()
    zero_shot.attach_label_spaces(TRAIN, [new, mixed])
    for space in (new, mixed):
        assert model.training_rows(space) is None and model.supports_label_space(space)
        torch.testing.assert_close(scores(model, space), scores(zero_shot, space), rtol=1e-6, atol=1e-5)
    skipping = taskres(test=(new,), other_label_spaces="skip")
    assert skipping.supports_label_space(TRAIN) and not skipping.supports_label_space(new)


def test_a_class_name_held_twice_takes_the_first_row_as_the_references_index_lookup():
    train = LabelSpace("train", ("crane", "tench", "crane", "church"), ("a photo of a {}.",))
    subset = LabelSpace("imagenet_r", ("church", "crane"), ("a photo of a {}.",))
    assert taskres(train, (subset,)).training_rows(subset) == [3, 0]


def test_the_residual_belongs_to_one_training_label_space():
    model = taskres()
    x = set_residual(model)
    model.attach_label_spaces(TRAIN, [TRAIN])  # the same classes keep theirs
    assert torch.equal(model.text_feature_residuals.detach(), x)
    other = LabelSpace("train", ("gas pump", "chain saw", "tench"), ("a photo of a {}.",))
    model.attach_label_spaces(other, [other])
    assert torch.equal(model.text_feature_residuals, torch.zeros(3, 64))


# ------------------------------------------------------------------ training and checkpoints


def test_the_towers_run_without_autograd_and_only_the_residual_gets_a_gradient():
    model = taskres().train()
    out = model.classification_forward((IMAGES, torch.tensor([0, 1, 4])))
    model.training_loss(out.logits, out.targets, out.text_features).backward()
    assert model.text_feature_residuals.grad is not None and model.text_feature_residuals.grad.abs().sum() > 0
    assert model.text_feature_residuals.grad[[2, 3]].abs().sum() > 0  # every class's row is in the softmax
    assert all(p.grad is None for p in model.clip.parameters())


def test_loss_falls_on_a_fixed_batch():
    model = taskres().train()
    batch = (torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 3, 4, 0]))
    assert_loss_falls(model, batch, lambda params: torch.optim.Adam(params, lr=0.05))


def test_checkpoint_holds_only_the_residual_and_round_trips():
    subset = LabelSpace("imagenet_a", ("golf ball", "goldfish"), ("a photo of a {}.",))
    trained = taskres(test=(subset,))
    set_residual(trained)
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == {"text_feature_residuals"}
    restored = taskres(test=(subset,))
    assert not torch.equal(scores(restored, TRAIN), scores(trained, TRAIN))
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"], strict=False)
    for space in (TRAIN, subset):
        assert torch.equal(scores(restored, space), scores(trained, space))


def test_bad_options_are_clear_errors():
    with pytest.raises(ConfigError, match="alpha=0.0: the residual's scale must be positive"):
        taskres(alpha=0.0)
    with pytest.raises(ConfigError, match="other_label_spaces='drop': pick zero_shot or skip"):
        taskres(other_label_spaces="drop")


# ------------------------------------------------------------------ the reference's recipes

# geekyutao/TaskRes (5195359) trainers/taskres.py: IMAGENET_TEMPLATES_SELECT + CUSTOM_TEMPLATES["ImageNet"]
IMAGENET_T0 = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
               "a {} in a video game.", "art of the {}.", "a photo of the small {}.", "a photo of a {}."]
# trainers/taskres.py CUSTOM_TEMPLATES: t0's template of every other dataset
REFERENCE_TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.", "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.", "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.", "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.", "sun397": "a photo of a {}.", "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
}


def assert_dassl_adam(cfg, lr: float) -> None:
    module = cfg.method.module
    assert (cfg.method.name, cfg.method.batch_size, cfg.method.drop_last) == ("taskres", 256, True)
    assert module.optimizer._target_ == "torch.optim.Adam"
    optimizer = module.optimizer
    assert (optimizer.lr, optimizer.weight_decay, list(optimizer.betas)) == (lr, 5e-4, [0.9, 0.999])
    assert (module.scheduler.name, module.scheduler.warmup, module.scheduler.warmup_lr) == ("dassl_cosine", 1, 1e-5)


@pytest.mark.parametrize("data, shots, lr, epochs, alpha", [
    ("dtd", 1, 2e-3, 100, 0.5), ("dtd", 4, 2e-3, 100, 0.5), ("dtd", 8, 2e-3, 200, 0.5), ("eurosat", 16, 2e-3, 200, 0.5),
    ("oxford_flowers", 2, 2e-3, 100, 1.0), ("oxford_flowers", 16, 2e-3, 200, 1.0),
    ("imagenet", 1, 2e-4, 100, 0.5), ("imagenet", 16, 2e-4, 200, 0.5),
])  # train_regular.sh: adam_lr2e-3 (2e-4 on ImageNet), ep100 at 1/2/4 shots and ep200 at 8/16, scale 1.0 on Flowers
def test_few_shot_experiment_is_the_references_regular_recipe(tmp_path, data, shots, lr, epochs, alpha):
    cfg = compose_cfg(tmp_path, ["experiment=taskres_few_shot", f"data={data}", f"protocol.shots={shots}"])
    assert_dassl_adam(cfg, lr)
    assert (cfg.protocol.name, cfg.trainer.max_epochs, cfg.method.module.alpha) == ("few_shot", epochs, alpha)


@pytest.mark.parametrize("data", [*sorted(REFERENCE_TEMPLATES), "imagenet"])
def test_t0_is_built_from_the_references_templates_on_every_dataset(tmp_path, data):
    cfg = compose_cfg(tmp_path, ["experiment=taskres_few_shot", f"data={data}"])
    templates = cfg.method.module.templates
    own = templates_for({"name": data, "templates": list(cfg.data.templates)}, cfg.prompt_templates)
    assert (list(templates) if templates else list(own)) == (IMAGENET_T0 if data == "imagenet"
                                                             else [REFERENCE_TEMPLATES[data]])


def test_domain_generalization_experiment_is_generalization_vit16(tmp_path):
    cfg = compose_cfg(tmp_path, ["experiment=taskres_domain_generalization"])
    assert_dassl_adam(cfg, 2e-4)
    assert (cfg.data.name, cfg.protocol.name, cfg.protocol.shots, cfg.trainer.max_epochs) == (
        "imagenet", "domain_generalization", 16, 200)
    assert cfg.method.module.alpha == 0.5 and list(cfg.method.module.templates) == IMAGENET_T0
    assert set(cfg.protocol.targets) == {"imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"}
