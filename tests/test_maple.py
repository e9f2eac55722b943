"""MaPLe: coupled deep prompts, exact to a direct block-by-block computation of the reference's forward."""

from __future__ import annotations

import pytest
import torch
from method_contract import (
    assert_loss_falls,
    reference_prompted_image_features,
    reference_prompted_text_features,
    train_then_evaluate,
)

from vlm_adapt.backbones import load_backbone
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.maple import MaPLe

SPACE = LabelSpace("toy", ("tench", "english springer", "cassette player", "chain saw"), ("a photo of a {}.",))


def maple(**kwargs) -> MaPLe:
    torch.manual_seed(0)
    model = MaPLe(load_backbone("vlm-tiny", None), **{"prompt_depth": 2, **kwargs})
    model.attach_label_spaces(SPACE, [SPACE])
    return model.eval()


def test_trains_3555072_parameters_at_vit_b16():
    model = MaPLe(load_backbone("ViT-B-16", None))
    names = {n.split(".")[0] for n in model.trainable_parameter_names()}
    assert names == {"ctx", "proj", "compound_prompts_text", "compound_prompt_projections"}
    assert len(model.compound_prompts_text) == len(model.compound_prompt_projections) == 8
    linear = 512 * 768 + 768
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 512 + 9 * linear + 8 * 2 * 512
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 3_555_072
    # as the reference: the coupling projections start as copies of one Linear, the context from "a photo"
    first = model.compound_prompt_projections[0]
    assert all(torch.equal(p.weight, first.weight) for p in model.compound_prompt_projections)
    tokens = model.tokenizer(["a photo of a"])
    torch.testing.assert_close(model.ctx.detach(), model.clip.token_embedding(tokens)[0, 1:3])


def reference_text_features(model: MaPLe, space: LabelSpace) -> torch.Tensor:
    """The reference TextEncoder: all 77 positions, prompts replaced at positions 1..M of blocks 1..J-1."""
    return reference_prompted_text_features(model.clip, model.tokenizer, "a photo of a", model.ctx,
                                            list(model.compound_prompts_text), space.classnames)


def reference_image_features(model: MaPLe, images: torch.Tensor) -> torch.Tensor:
    """The reference VisionTransformer_MaPLe: proj(ctx) appended before ln_pre, the last M tokens of blocks
    1..J-1 replaced by the projected deep prompts, ln_post on the class token."""
    deep = [project(prompt) for project, prompt in zip(model.compound_prompt_projections,
                                                        model.compound_prompts_text, strict=True)]
    return reference_prompted_image_features(model.clip.visual, model.proj(model.ctx), deep, images)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_features_equal_the_references_forward(depth):
    model = maple(prompt_depth=depth, text_chunk_size=3)
    with torch.no_grad():  # non-zero deep prompts and distinct projections, so every block's edit counts
        for p in [*model.compound_prompts_text, *model.compound_prompt_projections.parameters()]:
            p.normal_(0, 0.5)
        images = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(model.encode_label_space(SPACE), reference_text_features(model, SPACE),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.encode_images(images), reference_image_features(model, images),
                                   rtol=1e-4, atol=1e-5)
        assert not torch.allclose(model.encode_images(images), model.clip.encode_image(images), atol=1e-3)


def test_only_the_prompts_and_projections_get_gradients_and_the_loss_falls():
    model = maple().train()
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    assert_loss_falls(model, (images, labels), lambda params: torch.optim.Adam(params, lr=1e-2), steps=10, factor=0.8)
    assert all(p.grad is None for p in model.clip.parameters())
    assert model.compound_prompts_text[0].grad is not None
    assert model.compound_prompt_projections[0].weight.grad is not None


@pytest.mark.parametrize(("options", "match"), [
    ({"prompt_depth": 0}, "prompt_depth must be between 1 and"),
    ({"prompt_depth": 13}, "prompt_depth must be between 1 and"),
    ({"n_ctx": 0, "prompt_depth": 2}, "n_ctx must be a positive"),
    ({"n_ctx": 5, "prompt_depth": 2}, "ctx_init=null"),
    ({"n_ctx": 3, "ctx_init": "a photo", "prompt_depth": 2}, "fewer than n_ctx=3 tokens"),
])
def test_bad_options_are_refused_naming_the_option(options, match):
    with pytest.raises(ConfigError, match=match):
        MaPLe(load_backbone("vlm-tiny", None), **options)


def test_a_random_context_uses_placeholder_words():
    model = maple(ctx_init=None, n_ctx=3)
    assert model.prompt_prefix == "X X X" and model.ctx.shape == (3, model.towers.text_width)


def test_a_run_and_its_checkpoint_give_the_same_accuracy(make_cfg, tmp_path):
    record, evaluated = train_then_evaluate(make_cfg, tmp_path, "method=maple", "method.module.prompt_depth=2",
                                            "trainer.limit_test_batches=1")
    width, vision = 64, 64  # the tiny backbone's text and vision widths
    linear = width * vision + vision
    assert record["cost"]["trainable_params"] == 2 * width + 2 * linear + 2 * width
    assert evaluated["metrics"]["test/imagenette/acc"] == record["metrics"]["test/imagenette/acc"]


@pytest.mark.parametrize(("experiment", "depth", "lr", "epochs"), [
    ("maple_base2new", 9, 3.5e-3, 5), ("maple_cross_dataset", 3, 2.6e-3, 2),
    ("maple_domain_generalization", 3, 2.6e-3, 2),
])
def test_the_experiments_are_the_reference_recipe(make_cfg, experiment, depth, lr, epochs):
    """configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx(_cross_datasets).yaml, 16 shots."""
    cfg = make_cfg(f"experiment={experiment}", fast=False)
    module = cfg.method.module
    assert (cfg.method.batch_size, cfg.method.max_epochs, cfg.protocol.shots) == (4, epochs, 16)
    assert (module.n_ctx, module.ctx_init, module.prompt_depth) == (2, "a photo of a", depth)
    assert (module.optimizer.lr, module.optimizer.momentum, module.optimizer.weight_decay) == (lr, 0.9, 5e-4)
    assert (module.scheduler.name, module.scheduler.warmup, module.scheduler.warmup_lr) == ("dassl_cosine", 1, 1e-5)
