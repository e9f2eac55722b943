"""CoCoOp: per-image context from a meta-network, exact to a direct per-image computation."""

from __future__ import annotations

import pytest
import torch
from method_contract import assert_loss_falls, train_then_evaluate

from vlm_adapt.backbones import load_backbone
from vlm_adapt.backbones.towers import normalize
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.cocoop import CoCoOp
from vlm_adapt.methods.coop import CoOp

SPACE = LabelSpace("toy", ("tench", "english springer", "cassette player", "chain saw"), ("a photo of a {}.",))


def cocoop(**kwargs) -> CoCoOp:
    torch.manual_seed(0)
    model = CoCoOp(load_backbone("vlm-tiny", None), **kwargs)
    model.attach_label_spaces(SPACE, [SPACE])
    return model


def test_trains_the_context_and_the_meta_network_35360_at_vit_b16():
    model = CoCoOp(load_backbone("ViT-B-16", None), ctx_init_length="words")
    assert model.ctx.shape == (4, 512)
    assert {n.split(".")[0] for n in model.trainable_parameter_names()} == {"ctx", "meta_net"}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * 512 + 512 * 32 + 32 + 32 * 512 + 512


def test_per_image_class_features_equal_a_direct_computation_per_image():
    model = cocoop(text_chunk_size=3)  # chunks that cut across images
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        image_features = normalize(model.encode_images(images))
        features = model.per_image_class_features(image_features, SPACE)
        tokens, positions = model._tokens(SPACE)
        classes = torch.arange(len(tokens))
        for i in range(len(images)):
            ctx = (model.ctx + model.meta_net(image_features[i])).expand(len(tokens), -1, -1)
            embeddings = model.prompt_embeddings(tokens, positions, classes, ctx)
            direct = normalize(model.towers.encode_text_embeddings(embeddings, model.towers.eot_index(tokens)))
            torch.testing.assert_close(features[i], direct, rtol=1e-5, atol=1e-6)
        logits = model(images, SPACE)
        expected = model.clip.logit_scale.exp() * torch.stack([features[i] @ image_features[i] for i in range(2)])
        torch.testing.assert_close(logits, expected)


def test_without_the_meta_network_shift_it_is_coop():
    model = cocoop()
    with torch.no_grad():
        model.meta_net.linear2.weight.zero_()
        model.meta_net.linear2.bias.zero_()
    coop = CoOp(load_backbone("vlm-tiny", None), n_ctx=4)
    coop.clip.load_state_dict(model.clip.state_dict())
    coop.attach_label_spaces(SPACE, [SPACE])
    with torch.no_grad():
        coop.ctx.copy_(model.ctx)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images, SPACE), coop(images, SPACE), rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_context_and_the_meta_network_and_the_loss_falls():
    model = cocoop()
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    assert_loss_falls(model, (images, labels), lambda params: torch.optim.SGD(params, lr=0.5), steps=8, factor=0.9)
    assert all(p.grad is None for p in model.clip.parameters())
    assert model.ctx.grad is not None and model.meta_net.linear1.weight.grad is not None


def test_class_specific_context_is_refused():
    with pytest.raises(ConfigError, match="csc=false"):
        CoCoOp(load_backbone("vlm-tiny", None), csc=True)


def test_a_run_and_its_checkpoint_give_the_same_accuracy(make_cfg, tmp_path):
    record, evaluated = train_then_evaluate(make_cfg, tmp_path, "method=cocoop", "method.batch_size=4",
                                            "trainer.limit_test_batches=1")
    assert record["cost"]["trainable_params"] == 4 * 64 + 64 * 4 + 4 + 4 * 64 + 64
    assert evaluated["metrics"]["test/imagenette/acc"] == record["metrics"]["test/imagenette/acc"]


@pytest.mark.parametrize("experiment", ["cocoop_base2new", "cocoop_cross_dataset", "cocoop_domain_generalization"])
def test_the_experiments_are_the_reference_recipe(make_cfg, experiment):
    """KaiyangZhou/CoOp configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml, 16 shots."""
    cfg = make_cfg(f"experiment={experiment}", fast=False)
    module = cfg.method.module
    assert (cfg.method.batch_size, cfg.method.max_epochs, cfg.protocol.shots) == (1, 10, 16)
    assert (module.n_ctx, module.ctx_init, module.ctx_init_length, module.meta_reduction) == (
        4, "a photo of a", "words", 16)
    assert (module.optimizer.lr, module.optimizer.momentum, module.optimizer.weight_decay) == (2e-3, 0.9, 5e-4)
    assert (module.scheduler.name, module.scheduler.warmup, module.scheduler.warmup_lr) == ("dassl_cosine", 1, 1e-5)
