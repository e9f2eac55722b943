"""VPT shallow and deep on the image tower: only the vision tokens train (6,144 / 73,728 at ViT-B/16), the image
features equal a direct block-by-block computation of the reference's forward, the text side is CLIP's frozen
zero-shot classifier (the contract suite checks that the loss falls), and the configs carry the reference's recipe."""

from __future__ import annotations

import pytest
import torch
from method_contract import reference_prompted_image_features

from vlm_adapt.backbones import load_backbone
from vlm_adapt.backbones.towers import class_features, normalize
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.vpt import VPTDeep, VPTShallow

SPACE = LabelSpace("toy", ("tench", "english springer", "cassette player", "chain saw"), ("a photo of a {}.",))


def vpt(cls=VPTDeep, **kwargs):
    torch.manual_seed(0)
    model = cls(load_backbone("vlm-tiny", None), **kwargs)
    model.attach_label_spaces(SPACE, [SPACE])
    return model.eval()


def test_vit_b16_trains_exactly_the_vision_tokens():
    backbone = load_backbone("ViT-B-16", None)
    shallow, deep = VPTShallow(backbone), VPTDeep(load_backbone("ViT-B-16", None))
    assert shallow.trainable_parameter_names() == ["visual_ctx"]
    assert set(deep.trainable_parameter_names()) == {"visual_ctx", *(f"visual_prompts.{i}" for i in range(11))}
    count = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in
             (("shallow", shallow), ("deep", deep))}
    assert count == {"shallow": 8 * 768, "deep": 12 * 8 * 768} == {"shallow": 6_144, "deep": 73_728}


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_image_features_equal_the_references_forward(depth):
    model = vpt(prompt_depth_vision=depth, n_ctx_vision=3)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference_prompted_image_features(model.clip.visual, model.visual_ctx, list(model.visual_prompts),
                                                     images)
        torch.testing.assert_close(model.encode_images(images), expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(model.encode_images(images), model.clip.encode_image(images), atol=1e-3)
    assert len(model.visual_prompts) == depth - 1 and model.visual_ctx.shape == (3, model.towers.image_width)


def test_the_text_side_is_the_frozen_zero_shot_classifier_and_only_the_tokens_get_gradients():
    model = vpt(prompt_depth_vision=2).train()
    with torch.no_grad():
        zero_shot = class_features(model.clip.encode_text(model.tokenizer(list(SPACE.prompts()))), 1)
    torch.testing.assert_close(model.class_text_features(SPACE), normalize(zero_shot), rtol=1e-4, atol=1e-5)
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    out = model.classification_forward((images, labels))
    model.training_loss(out.logits, out.targets, out.text_features).backward()
    assert all(p.grad is None for p in model.clip.parameters())
    assert model.visual_ctx.grad is not None and model.visual_prompts[0].grad is not None


@pytest.mark.parametrize(("cls", "options", "match"), [
    (VPTDeep, {"prompt_depth_vision": 0}, "prompt_depth_vision must be between 1 and 4"),
    (VPTDeep, {"prompt_depth_vision": 5}, "prompt_depth_vision must be between 1 and 4"),
    (VPTDeep, {"n_ctx_vision": 0}, "n_ctx_vision must be a positive"),
    (VPTShallow, {"prompt_depth_vision": 3}, "use method=vpt_deep"),
])
def test_bad_options_are_refused_naming_the_option(cls, options, match):
    with pytest.raises(ConfigError, match=match):
        cls(load_backbone("vlm-tiny", None), **options)


@pytest.mark.parametrize("name", ["vpt_shallow", "vpt_deep"])
@pytest.mark.parametrize("protocol", ["base2new", "cross_dataset", "domain_generalization"])
def test_the_experiments_are_the_reference_recipe(make_cfg, name, protocol):
    """configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml, 16 shots, "a photo of a {}." everywhere."""
    cfg = make_cfg(f"experiment={name}_{protocol}", fast=False)
    module = cfg.method.module
    assert (cfg.method.batch_size, cfg.method.max_epochs, cfg.protocol.shots) == (4, 5, 16)
    assert (module.n_ctx_vision, module.get("prompt_depth_vision", 1)) == (8, 12 if name == "vpt_deep" else 1)
    assert (module.optimizer.lr, module.optimizer.momentum, module.optimizer.weight_decay) == (2.5e-3, 0.9, 5e-4)
    assert (module.scheduler.warmup, module.scheduler.warmup_lr, cfg.prompt_templates) == (1, 1e-5, "photo")
    assert cfg.protocol.name == protocol and (protocol == "base2new" or cfg.data.name == "imagenet")
