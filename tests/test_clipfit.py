"""CLIPFit: exactly the text c_proj biases and image LayerNorms train, the loss learns, the regulariser
anchors text features to their zero-shot values, and the recipes pick lambda and epochs per dataset."""

import json

import pytest
import torch

from vlm_adapt.backbones import load_backbone
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.methods.clipfit import CLIPFit
from vlm_adapt.train import train

TRAIN = LabelSpace("train", ("tench", "goldfish", "church", "parachute"), ("a photo of a {}.",))
TEST = LabelSpace("new", ("golf ball", "gas pump"), ("a photo of a {}.",))


def expected_names(model: CLIPFit) -> set[str]:
    text = {f"clip.transformer.resblocks.{i}.mlp.c_proj.bias" for i in range(model.towers.num_text_layers)}
    blocks = [f"clip.visual.transformer.resblocks.{i}" for i in range(model.towers.num_image_layers)]
    norms = ["clip.visual.ln_pre", "clip.visual.ln_post"] + [f"{b}.ln_{k}" for b in blocks for k in (1, 2)]
    return text | {f"{norm}.{p}" for norm in norms for p in ("weight", "bias")}


@pytest.fixture
def clipfit() -> CLIPFit:
    torch.manual_seed(0)
    model = CLIPFit(load_backbone("vlm-tiny", None), reg_weight=8.0)
    model.attach_label_spaces(TRAIN, [TRAIN, TEST])
    return model


def test_trainable_parameters_are_text_cproj_biases_and_image_layernorms(clipfit):
    assert set(clipfit.trainable_parameter_names()) == expected_names(clipfit)
    text_width = clipfit.clip.transformer.width
    image_width = clipfit.clip.visual.transformer.width
    layers_t, layers_i = clipfit.towers.num_text_layers, clipfit.towers.num_image_layers
    formula = layers_t * text_width + (2 + 2 * layers_i) * 2 * image_width
    assert sum(p.numel() for p in clipfit.parameters() if p.requires_grad) == formula


def test_vit_b16_trains_46080_parameters():
    model = CLIPFit(load_backbone("ViT-B-16", None))
    assert set(model.trainable_parameter_names()) == expected_names(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 46_080


def test_zero_shot_features_belong_to_the_training_label_space(clipfit):
    clipfit.setup("fit")
    assert clipfit.zero_shot_text_features.shape[0] == TRAIN.num_classes
    with torch.no_grad():
        torch.testing.assert_close(clipfit.zero_shot_text_features, clipfit.encode_label_space(TRAIN))


def test_regulariser_is_zero_at_init_and_positive_after_the_biases_move(clipfit):
    clipfit.setup("fit")
    with torch.no_grad():
        assert clipfit.text_regulariser(clipfit.encode_label_space(TRAIN)).abs().item() < 1e-6
        for block in clipfit.clip.transformer.resblocks:
            block.mlp.c_proj.bias.add_(0.5 * torch.randn_like(block.mlp.c_proj.bias))
        assert clipfit.text_regulariser(clipfit.encode_label_space(TRAIN)).item() > 1e-3


def test_loss_falls_on_a_fixed_batch(clipfit):
    clipfit.setup("fit")
    clipfit.train()
    images, labels = torch.randn(4, 3, 64, 64), torch.arange(4)
    optimizer = torch.optim.Adam([p for p in clipfit.parameters() if p.requires_grad], lr=0.01)

    def loss() -> torch.Tensor:
        text = clipfit.class_text_features(TRAIN)
        return clipfit.training_loss(clipfit.logits(clipfit.encode_images(images), text), labels, text)

    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] < 0.8 * losses[0]


def test_short_run_writes_metrics(make_cfg, tmp_path):
    train(make_cfg("method=clipfit"))
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "completed" and record["method"] == "clipfit"
    assert record["cost"]["trainable_params"] == 4 * 64 + (2 + 2 * 4) * 2 * 64
    assert 0.0 <= record["metrics"]["test/imagenette/acc"] <= 100.0


@pytest.mark.parametrize(
    ("experiment", "dataset", "reg_weight", "epochs", "protocol"),
    [
        ("clipfit_base2new", "dtd", 8.0, 100, "base2new"),
        ("clipfit_base2new", "food101", 8.0, 10, "base2new"),
        ("clipfit_few_shot", "dtd", 8.0, 100, "few_shot"),
        ("clipfit_few_shot", "sun397", 8.0, 100, "few_shot"),
        ("clipfit_few_shot", "oxford_pets", 2.0, 100, "few_shot"),
        ("clipfit_few_shot", "imagenet", 2.0, 10, "few_shot"),
    ],
)
def test_experiments_pick_the_papers_lambda_and_epochs(make_cfg, experiment, dataset, reg_weight, epochs,
                                                       protocol):
    cfg = make_cfg(f"experiment={experiment}", f"data={dataset}", fast=False)
    assert cfg.method.name == "clipfit" and cfg.protocol.name == protocol and cfg.protocol.shots == 16
    assert cfg.method.module.reg_weight == reg_weight
    assert cfg.trainer.max_epochs == epochs and cfg.method.batch_size == 32
    assert cfg.method.module.optimizer.lr == 2e-3 and cfg.method.module.scheduler.warmup_lr == 1e-5


def test_explicit_lambda_overrides_the_per_dataset_default(make_cfg):
    cfg = make_cfg("experiment=clipfit_few_shot", "data=dtd", "method.module.reg_weight=4", fast=False)
    assert cfg.method.module.reg_weight == 4


def test_base2new_run_trains_on_base_classes(make_cfg, tmp_path):
    train(make_cfg("experiment=clipfit_base2new", "trainer.limit_train_batches=1"))
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"test/base/acc", "test/new/acc", "test/hm"} <= set(record["metrics"])
