"""KgCoOp: CoOp's context (4 vectors from "a photo of a") plus w * (1 - mean cos) to the hand-crafted prompt's
zero-shot text features; only the context trains, the regulariser is exact, checkpoints round-trip, and the
experiments carry the reference's recipe (htyao89/KgCoOp)."""


import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg
from method_contract import assert_loss_falls, train_then_evaluate

from vlm_adapt.backbones import load_backbone
from vlm_adapt.build import build_method, to_plain
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.data.templates import templates_for
from vlm_adapt.methods.coop import CoOp
from vlm_adapt.methods.kgcoop import KgCoOp
from vlm_adapt.methods.registry import method_spec

PHOTO = LabelSpace("toy", ("tench", "goldfish", "church", "parachute"), ("a photo of a {}.",))
TEXTURE = LabelSpace("dtd", ("banded", "blotchy", "braided"), ("a photo of a {}, a type of texture.",))

# htyao89/KgCoOp (c43ccc3) trainers/kgcoop.py CUSTOM_TEMPLATES: the prompt t0 is encoded from, per dataset
REFERENCE_T0_TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.", "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.", "dtd": "a photo of a {}, a type of texture.",
    "eurosat": "a centered satellite photo of {}.", "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.", "sun397": "a photo of a {}.", "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.", "imagenet": "a photo of a {}.", "imagenet_sketch": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.", "imagenet_a": "a photo of a {}.", "imagenet_r": "a photo of a {}.",
}


def kgcoop(space: LabelSpace = PHOTO, **kwargs) -> KgCoOp:
    model = KgCoOp(load_backbone("vlm-tiny", None, init_seed=1), **kwargs)
    model.attach_label_spaces(space, [space])
    model.setup("fit")
    return model


def direct_text_features(model: KgCoOp, prompts: list[str]) -> torch.Tensor:
    """Normalized features of plain prompts through open_clip's own text encoder."""
    with torch.no_grad():
        return F.normalize(model.clip.encode_text(model.tokenizer(prompts)), dim=-1)


def test_kgcoop_is_coop_registered_under_its_own_name_and_trains_only_4_context_vectors():
    model = kgcoop()
    assert isinstance(model, CoOp) and method_spec("kgcoop").cls is KgCoOp and method_spec("coop").cls is CoOp
    assert model.trainable_parameter_names() == ["ctx"] and model.ctx.shape == (4, 64)
    words = model.towers.token_embeddings(model.tokenizer(["a photo of a"]))[0, 1:5]
    torch.testing.assert_close(model.ctx.detach(), words)  # initialised from "a photo of a"


def test_vit_b16_trains_2048_parameters():
    model = KgCoOp(load_backbone("ViT-B-16", None))
    assert model.trainable_parameter_names() == ["ctx"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * 512 == 2_048


def test_t0_is_clips_zero_shot_feature_of_the_hand_crafted_prompt():
    model = kgcoop(TEXTURE)
    expected = direct_text_features(model, [f"a photo of a {name}, a type of texture." for name in TEXTURE.classnames])
    torch.testing.assert_close(model.text_anchor.features, expected, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # t0 is stored once: the learned context never moves it
        model.ctx.add_(torch.randn_like(model.ctx))
    model.setup("fit")
    torch.testing.assert_close(model.text_anchor.features, expected, atol=1e-6, rtol=1e-5)


def test_regulariser_and_loss_are_the_references_formula():
    model = kgcoop(TEXTURE)
    torch.manual_seed(0)
    text = F.normalize(torch.randn(3, 64), dim=-1)
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    t0 = model.text_anchor.features
    cosines = (text * t0).sum(-1) / (text.norm(dim=-1) * t0.norm(dim=-1))
    expected = F.cross_entropy(logits, labels) + 8.0 * (1.0 - cosines.mean())
    torch.testing.assert_close(model.training_loss(logits, labels, text), expected)
    assert model.knowledge_guided_loss(t0).abs().item() < 1e-6
    # the paper's lambda * mean ||t_c - t0_c||^2 is 2 lambda (1 - mean cos): its lambda = 8 is reg_weight = 16
    squared = (text - t0).pow(2).sum(-1).mean()
    torch.testing.assert_close(squared, 2 * model.knowledge_guided_loss(text))


def test_learned_prompt_starts_as_the_hand_crafted_one_so_the_regulariser_starts_at_zero():
    # context "a photo of a" + "<class>." is exactly the hand-crafted prompt "a photo of a {}."
    model = kgcoop(PHOTO)
    learned = model.encode_label_space(PHOTO)
    torch.testing.assert_close(learned, direct_text_features(model, [f"a photo of a {n}." for n in PHOTO.classnames]),
                               atol=1e-5, rtol=1e-4)
    assert model.knowledge_guided_loss(learned).item() < 1e-5
    texture = kgcoop(TEXTURE)  # "a photo of a {}." is not DTD's hand-crafted prompt
    assert texture.knowledge_guided_loss(texture.encode_label_space(TEXTURE)).item() > 1e-4


def test_regulariser_gradient_reaches_only_the_context():
    model = kgcoop(TEXTURE)
    model.train()
    model.knowledge_guided_loss(model.class_text_features(TEXTURE)).backward()
    assert model.ctx.grad is not None and model.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.clip.parameters())


def test_a_new_training_label_space_gets_its_own_t0():
    model = kgcoop(PHOTO)
    first = model.text_anchor.features
    model.attach_label_spaces(PHOTO, [PHOTO])
    assert model.text_anchor.features is first  # the same classes keep theirs
    model.attach_label_spaces(TEXTURE, [TEXTURE])
    assert model.text_anchor.features is None
    model.setup("fit")
    assert model.text_anchor.features.shape == (3, 64) and model.text_anchor.space == TEXTURE
    with pytest.raises(ValueError, match="do not match"):
        model.knowledge_guided_loss(first)


def test_loss_falls_on_a_fixed_batch():
    model = kgcoop(TEXTURE)
    model.train()
    torch.manual_seed(0)
    images, labels = torch.randn(6, 3, 64, 64), torch.tensor([0, 1, 2, 0, 1, 2])
    assert model.trainable_parameter_names() == ["ctx"]
    assert_loss_falls(model, (images, labels), lambda params: torch.optim.Adam(params, lr=0.01))


def test_checkpoint_round_trip_gives_identical_logits():
    trained = kgcoop(TEXTURE)
    with torch.no_grad():
        trained.ctx.add_(0.1 * torch.randn_like(trained.ctx))
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == {"ctx"}
    restored = kgcoop(TEXTURE)
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"], strict=False)
    trained.eval(), restored.eval()
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(trained(images, TEXTURE), restored(images, TEXTURE))
        assert not torch.equal(kgcoop(TEXTURE)(images, TEXTURE), trained(images, TEXTURE))


def test_training_run_writes_metrics_and_its_checkpoint_evaluates_to_the_same_accuracy(make_cfg, tmp_path):
    record, evaluated = train_then_evaluate(make_cfg, tmp_path, "method=kgcoop")
    assert record["status"] == "completed" and record["method"] == "kgcoop"
    assert record["cost"]["trainable_params"] == 4 * 64
    checkpoint = torch.load(record["checkpoint"], weights_only=True)
    assert set(checkpoint["state_dict"]) == {"ctx"}
    assert evaluated["method"] == "kgcoop"
    assert evaluated["metrics"]["test/imagenette/acc"] == record["metrics"]["test/imagenette/acc"]


# ------------------------------------------------------------------ the reference's recipes


def compose(tmp_path, *overrides):
    return compose_cfg(tmp_path, list(overrides))


@pytest.mark.parametrize("experiment, protocol, shots", [("kgcoop_base2new", "base2new", 16),
                                                         ("kgcoop_few_shot", "few_shot", 4)])
@pytest.mark.parametrize("data", ["dtd", "imagenet", "food101"])
def test_experiments_are_the_references_recipe(experiment, protocol, shots, data, tmp_path):
    # configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml + scripts/base2new_train.sh, run.sh, xd_train.sh
    cfg = compose(tmp_path, f"experiment={experiment}", f"data={data}")
    module = cfg.method.module
    assert (cfg.method.name, cfg.protocol.name, cfg.protocol.shots) == ("kgcoop", protocol, shots)
    assert (cfg.method.batch_size, cfg.trainer.max_epochs, cfg.method.drop_last) == (128, 100, True)
    assert (module.optimizer.lr, module.optimizer.momentum, module.optimizer.weight_decay) == (2e-3, 0.9, 5e-4)
    assert (module.scheduler.name, module.scheduler.warmup, module.scheduler.warmup_lr) == ("dassl_cosine", 1, 1e-5)
    assert (module.reg_weight, module.ctx_init, module.ctx_init_length) == (8.0, "a photo of a", "words")
    assert (module.class_token_position, module.csc) == ("end", False)
    own = templates_for({"name": data, "templates": list(cfg.data.templates)}, cfg.prompt_templates)
    assert own == (REFERENCE_T0_TEMPLATES[data],)


@pytest.mark.parametrize("data", sorted(REFERENCE_T0_TEMPLATES))
def test_t0_templates_are_the_references_custom_templates_on_every_dataset(data, tmp_path):
    cfg = compose(tmp_path, "experiment=kgcoop_base2new", f"data={data}")
    assert templates_for({"name": data, "templates": list(cfg.data.templates)}, cfg.prompt_templates) == (
        REFERENCE_T0_TEMPLATES[data],)


def test_method_defaults_are_the_recipe_and_build_4_vectors(tmp_path):
    cfg = compose(tmp_path, "method=kgcoop", "backbone=tiny")
    assert (cfg.method.batch_size, cfg.trainer.max_epochs, cfg.method.module.reg_weight) == (128, 100, 8.0)
    model = build_method(cfg.method.module, load_backbone(**to_plain(cfg.backbone)))
    assert isinstance(model, KgCoOp) and model.ctx.shape == (4, 64) and model.reg_weight == 8.0
    assert type(model).encode_label_space is CoOp.encode_label_space  # the learned prompt is CoOp's
