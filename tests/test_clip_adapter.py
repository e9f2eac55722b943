"""CLIP-Adapter: a bias-free bottleneck MLP (reduction 4) on the frozen image feature, mixed with ratio 0.2;
only the adapter trains, the frozen towers run without autograd, the logits are the paper's formula,
checkpoints round-trip, and the experiment carries the reference's recipe (gaopengcuhk/CLIP-Adapter)."""


import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg
from method_contract import assert_loss_falls, train_then_evaluate

from vlm_adapt.backbones import load_backbone
from vlm_adapt.build import build_method, to_plain
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.data.templates import templates_for
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.clip_adapter import CLIPAdapter
from vlm_adapt.methods.registry import method_spec
from vlm_adapt.methods.zero_shot import ZeroShot

SPACE = LabelSpace("toy", ("tench", "goldfish", "church", "parachute"), ("a photo of a {}.",))

# gaopengcuhk/CLIP-Adapter (08d07f8) clip_adapter.py CUSTOM_TEMPLATES: the frozen text side, per dataset
REFERENCE_TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.", "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.", "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.", "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.", "sun397": "a photo of a {}.", "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.", "imagenet": "a photo of a {}.", "imagenet_sketch": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.", "imagenet_a": "a photo of a {}.", "imagenet_r": "a photo of a {}.",
}


def adapter(seed: int = 0, **kwargs) -> CLIPAdapter:
    torch.manual_seed(seed)  # the adapter's initialisation
    model = CLIPAdapter(load_backbone("vlm-tiny", None, init_seed=1), **kwargs)
    model.attach_label_spaces(SPACE, [SPACE])
    return model


def test_only_the_bias_free_bottleneck_trains():
    model = adapter()
    assert method_spec("clip_adapter").cls is CLIPAdapter and method_spec("clip_adapter").tasks == ("classification",)
    assert model.trainable_parameter_names() == ["adapter.0.weight", "adapter.2.weight"]
    assert model.adapter[0].weight.shape == (16, 64) and model.adapter[2].weight.shape == (64, 16)
    assert [type(m) for m in model.adapter] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear, torch.nn.ReLU]
    assert model.adapter[0].bias is None and model.adapter[2].bias is None
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 64 * 16


def test_vit_b16_trains_131072_parameters():
    model = CLIPAdapter(load_backbone("ViT-B-16", None))
    assert model.trainable_parameter_names() == ["adapter.0.weight", "adapter.2.weight"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 512 * 128 == 131_072


def test_logits_are_the_papers_residual_mix_against_the_frozen_zero_shot_text_features():
    model = adapter().eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        f = model.clip.encode_image(images)
        w1, w2 = model.adapter[0].weight, model.adapter[2].weight
        x = 0.2 * torch.relu(torch.relu(f @ w1.t()) @ w2.t()) + 0.8 * f
        text = F.normalize(model.clip.encode_text(model.tokenizer([f"a photo of a {n}." for n in SPACE.classnames])),
                           dim=-1)
        expected = model.clip.logit_scale.exp() * F.normalize(x, dim=-1) @ text.t()
        torch.testing.assert_close(model(images, SPACE), expected, atol=1e-5, rtol=1e-4)


def test_ratio_zero_is_zero_shot_clip():
    model = adapter(ratio=0.0).eval()
    zero_shot = ZeroShot(load_backbone("vlm-tiny", None, init_seed=1)).eval()
    zero_shot.attach_label_spaces(SPACE, [SPACE])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images, SPACE), zero_shot(images, SPACE))


def test_the_towers_run_without_autograd_and_gradients_reach_only_the_adapter():
    model = adapter().train()
    images, labels = torch.randn(4, 3, 64, 64), torch.arange(4)
    frozen = CLIPMethod.encode_images(model, images)  # the image feature before the adapter
    assert not frozen.requires_grad
    out = model.classification_forward((images, labels))
    assert not out.text_features.requires_grad
    model.training_loss(out.logits, out.targets, out.text_features).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter.parameters())
    assert all(p.grad is None for p in model.clip.parameters())


def test_loss_falls_on_a_fixed_batch():
    model = adapter().train()
    images, labels = torch.randn(4, 3, 64, 64), torch.arange(4)
    assert_loss_falls(model, (images, labels), lambda params: torch.optim.Adam(params, lr=0.05))


def test_checkpoint_round_trip_gives_identical_logits():
    trained = adapter(seed=0)
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == {"adapter.0.weight", "adapter.2.weight"}
    restored = adapter(seed=1)  # another initialisation, overwritten by the checkpoint
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(restored.eval()(images, SPACE), trained.eval()(images, SPACE))
        restored.on_load_checkpoint(checkpoint)
        restored.load_state_dict(checkpoint["state_dict"], strict=False)
        assert torch.equal(restored(images, SPACE), trained(images, SPACE))


def test_bad_options_are_clear_errors():
    with pytest.raises(ConfigError, match="ratio"):
        adapter(ratio=1.5)
    with pytest.raises(ConfigError, match="reduction=5 must divide"):
        adapter(reduction=5)


def test_training_run_writes_metrics_and_its_checkpoint_evaluates_to_the_same_accuracy(make_cfg, tmp_path):
    record, evaluated = train_then_evaluate(make_cfg, tmp_path, "method=clip_adapter")
    assert record["status"] == "completed" and record["method"] == "clip_adapter"
    assert record["cost"]["trainable_params"] == 2 * 64 * 16
    checkpoint = torch.load(record["checkpoint"], weights_only=True)
    assert set(checkpoint["state_dict"]) == {"adapter.0.weight", "adapter.2.weight"}
    assert evaluated["method"] == "clip_adapter"
    assert evaluated["metrics"]["test/imagenette/acc"] == record["metrics"]["test/imagenette/acc"]


# ------------------------------------------------------------------ the reference's recipe


def compose(tmp_path, *overrides):
    return compose_cfg(tmp_path, list(overrides))


@pytest.mark.parametrize("data, shots, epochs", [("dtd", 1, 50), ("dtd", 2, 100), ("dtd", 4, 100), ("dtd", 8, 200),
                                                  ("dtd", 16, 200), ("imagenet", 1, 50), ("imagenet", 16, 50)])
def test_few_shot_experiment_is_coops_dassl_recipe(data, shots, epochs, tmp_path):
    # the reference's README: clip_adapter.py run with CoOp's commands (CoOp scripts/coop/main.sh, COOP.md)
    cfg = compose(tmp_path, "experiment=clip_adapter_few_shot", f"data={data}", f"protocol.shots={shots}")
    module = cfg.method.module
    assert (cfg.method.name, cfg.protocol.name, cfg.trainer.max_epochs) == ("clip_adapter", "few_shot", epochs)
    assert (cfg.method.batch_size, cfg.method.drop_last) == (32, True)
    assert (module.optimizer.lr, module.optimizer.momentum, module.optimizer.weight_decay) == (2e-3, 0.9, 5e-4)
    assert (module.scheduler.name, module.scheduler.warmup, module.scheduler.warmup_lr) == ("dassl_cosine", 1, 1e-5)
    assert (module.ratio, module.reduction) == (0.2, 4)


@pytest.mark.parametrize("data", sorted(REFERENCE_TEMPLATES))
def test_text_side_uses_the_references_templates_on_every_dataset(data, tmp_path):
    cfg = compose(tmp_path, "experiment=clip_adapter_few_shot", f"data={data}")
    assert templates_for({"name": data, "templates": list(cfg.data.templates)}, cfg.prompt_templates) == (
        REFERENCE_TEMPLATES[data],)


def test_method_defaults_are_the_recipe(tmp_path):
    cfg = compose(tmp_path, "method=clip_adapter", "backbone=tiny")
    assert (cfg.method.batch_size, cfg.trainer.max_epochs, cfg.protocol.shots) == (32, 200, 16)
    model = build_method(cfg.method.module, load_backbone(**to_plain(cfg.backbone)))
    assert isinstance(model, CLIPAdapter) and model.ratio == 0.2 and model.adapter[0].out_features == 16
