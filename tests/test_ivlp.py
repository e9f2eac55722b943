"""IVLP: independent deep prompts in both towers. Only the prompts train (30,720 at ViT-B/16), both towers equal a
direct block-by-block computation of the reference's forward, and the configs carry the reference's recipe."""

from __future__ import annotations

import pytest
import torch
from method_contract import reference_prompted_image_features, reference_prompted_text_features

from vlm_adapt.backbones import load_backbone
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.ivlp import IVLP

SPACE = LabelSpace("toy", ("tench", "english springer", "cassette player", "chain saw"), ("a photo of a {}.",))


def ivlp(**kwargs) -> IVLP:
    torch.manual_seed(0)
    model = IVLP(load_backbone("vlm-tiny", None), **{"prompt_depth_text": 3, "prompt_depth_vision": 2, **kwargs})
    model.attach_label_spaces(SPACE, [SPACE])
    return model.eval()


def test_vit_b16_trains_exactly_the_30720_prompt_parameters():
    model = IVLP(load_backbone("ViT-B-16", None))
    assert set(model.trainable_parameter_names()) == {"ctx", "visual_ctx", *(f"text_prompts.{i}" for i in range(11)),
                                                      *(f"visual_prompts.{i}" for i in range(11))}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 12 * 2 * 512 + 12 * 2 * 768 == 30_720
    tokens = model.tokenizer(["a photo of a"])  # the context starts from the first 2 tokens of "a photo of a"
    torch.testing.assert_close(model.ctx.detach(), model.clip.token_embedding(tokens)[0, 1:3])


@pytest.mark.parametrize(("text_depth", "vision_depth"), [(1, 1), (3, 2), (4, 4)])
def test_both_towers_equal_the_references_forward(text_depth, vision_depth):
    model = ivlp(prompt_depth_text=text_depth, prompt_depth_vision=vision_depth, text_chunk_size=3)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for p in model.text_prompts:
            p.normal_(0, 0.5)  # non-zero deep prompts, so every block's edit counts
        torch.testing.assert_close(model.encode_label_space(SPACE), reference_prompted_text_features(
            model.clip, model.tokenizer, "a photo of a", model.ctx, list(model.text_prompts), SPACE.classnames),
                                   rtol=1e-4, atol=1e-5)
        expected = reference_prompted_image_features(model.clip.visual, model.visual_ctx, list(model.visual_prompts),
                                                     images)
        torch.testing.assert_close(model.encode_images(images), expected, rtol=1e-4, atol=1e-5)


def test_only_the_prompts_get_gradients():
    model = ivlp().train()
    out = model.classification_forward((torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])))
    model.training_loss(out.logits, out.targets, out.text_features).backward()
    assert all(p.grad is None for p in model.clip.parameters())
    assert all(p.grad is not None for p in [model.ctx, model.visual_ctx, *model.text_prompts, *model.visual_prompts])


@pytest.mark.parametrize(("options", "match"), [
    ({"prompt_depth_text": 5}, "prompt_depth_text must be between 1 and 4"),
    ({"prompt_depth_vision": 0}, "prompt_depth_vision must be between 1 and 4"),
    ({"n_ctx_text": 5}, "ctx_init=null"),
    ({"n_ctx_text": 3, "ctx_init": "a photo"}, "fewer than n_ctx=3 tokens"),
    ({"n_ctx_vision": -1}, "n_ctx_vision must be a positive"),
])
def test_bad_options_are_refused_naming_the_option(options, match):
    with pytest.raises(ConfigError, match=match):
        IVLP(load_backbone("vlm-tiny", None), **{"prompt_depth_text": 2, "prompt_depth_vision": 2, **options})


@pytest.mark.parametrize("protocol", ["base2new", "cross_dataset", "domain_generalization"])
def test_the_experiments_are_the_reference_recipe(make_cfg, protocol):
    """configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml, 16 shots."""
    cfg = make_cfg(f"experiment=ivlp_{protocol}", fast=False)
    module = cfg.method.module
    assert (cfg.method.batch_size, cfg.method.max_epochs, cfg.protocol.shots) == (4, 5, 16)
    depths = (module.prompt_depth_text, module.prompt_depth_vision)
    assert (module.n_ctx_text, module.n_ctx_vision, *depths) == (2, 2, 12, 12)
    assert (module.ctx_init, module.optimizer.lr, module.optimizer.momentum) == ("a photo of a", 3.5e-3, 0.9)
    assert (module.scheduler.warmup, module.scheduler.warmup_lr) == (1, 1e-5)
