"""BitFit: exactly the bias terms of both towers train (LayerNorm biases included, as the reference's `all`),
171,008 at ViT-B/16; weights, embeddings, projections and logit_scale stay frozen, the loss falls, checkpoints hold
only the biases, and the experiments carry the chosen recipe (the Dassl recipe of CLIPFit's bias tuning)."""

import pytest
import torch
from conftest import compose_cfg
from method_contract import assert_loss_falls

from vlm_adapt.backbones import load_backbone
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.data.templates import templates_for
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.bitfit import BitFit, bias_parameters
from vlm_adapt.methods.registry import method_spec

SPACE = LabelSpace("toy", ("tench", "goldfish", "church", "parachute"), ("a photo of a {}.",))
BLOCK_BIASES = ("attn.in_proj_bias", "attn.out_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias", "ln_1.bias",
                "ln_2.bias")


def expected_names(layers: int, encoder: str = "both", layer_norm: bool = True) -> set[str]:
    towers = {"vision": ("clip.visual.transformer", ["clip.visual.ln_pre.bias", "clip.visual.ln_post.bias"]),
              "text": ("clip.transformer", ["clip.ln_final.bias"])}
    names = set()
    for tower in (towers if encoder == "both" else [encoder]):
        prefix, norms = towers[tower]
        names |= {f"{prefix}.resblocks.{i}.{b}" for i in range(layers) for b in BLOCK_BIASES}
        names |= set(norms)
    return {n for n in names if layer_norm or ".ln_" not in n}


def bias_count(model: BitFit, layer_norm: bool = True) -> int:
    """From the architecture: per block of width W and MLP width M, 3W (q, k, v) + W (out_proj) + M (c_fc) +
    W (c_proj) + 2W (ln_1, ln_2) biases; plus ln_pre and ln_post (image) and ln_final (text)."""
    total = 0
    for tower, norms in ((model.clip.visual.transformer, 2), (model.clip.transformer, 1)):
        width, mlp = tower.width, tower.resblocks[0].mlp.c_fc.out_features
        total += tower.layers * (5 * width + mlp + (2 * width if layer_norm else 0))
        total += norms * width if layer_norm else 0
    return total


def bitfit(**kwargs) -> BitFit:
    model = BitFit(load_backbone("vlm-tiny", None, init_seed=1), **kwargs)
    model.attach_label_spaces(SPACE, [SPACE])
    return model


def trainable_count(model: BitFit) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_every_bias_of_both_towers_trains_and_nothing_else():
    model = bitfit()
    assert method_spec("bitfit").cls is BitFit and method_spec("bitfit").tasks == ("classification",)
    assert set(model.trainable_parameter_names()) == expected_names(4)
    assert trainable_count(model) == bias_count(model) == 4 * 11 * 64 * 2 + 3 * 64
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {"clip.logit_scale", "clip.visual.conv1.weight", "clip.text_projection", "clip.visual.proj",
            "clip.token_embedding.weight", "clip.visual.ln_pre.weight", "clip.ln_final.weight"} <= frozen
    assert not any("bias" in n for n in frozen)


def test_vit_b16_trains_171008_bias_parameters():
    model = BitFit(load_backbone("ViT-B-16", None))
    assert set(model.trainable_parameter_names()) == expected_names(12)
    assert trainable_count(model) == bias_count(model) == 12 * 11 * 768 + 2 * 768 + 12 * 11 * 512 + 512 == 171_008
    without_norms = sum(p.numel() for p in bias_parameters(model.clip, layer_norm=False))
    assert without_norms == bias_count(model, layer_norm=False) == 138_240


@pytest.mark.parametrize("encoder, layer_norm", [("text", True), ("vision", True), ("both", False)])
def test_encoder_and_layer_norm_choose_the_biases(encoder, layer_norm):
    model = bitfit(encoder=encoder, layer_norm=layer_norm)
    assert set(model.trainable_parameter_names()) == expected_names(4, encoder, layer_norm)


def test_a_step_moves_only_the_biases():
    model = bitfit().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images, labels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)), torch.arange(4)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model.classification_forward((images, labels))
    assert out.text_features.requires_grad  # the class prompts go through the tuned text tower
    model.training_loss(out.logits, out.targets, out.text_features).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and changed <= expected_names(4)
    assert {"visual", "transformer", "ln_final"} == {n.split(".")[1] for n in changed}  # both towers moved


def test_loss_falls_on_a_fixed_batch():
    model = bitfit().train()
    batch = (torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert_loss_falls(model, batch, lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))


def test_checkpoint_holds_only_the_biases_and_round_trips():
    trained = bitfit()
    with torch.no_grad():
        for p in bias_parameters(trained.clip):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == expected_names(4)
    restored = bitfit().eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert not torch.equal(bitfit().eval()(images, SPACE), trained.eval()(images, SPACE))
        restored.on_load_checkpoint(checkpoint)
        restored.load_state_dict(checkpoint["state_dict"], strict=False)
        assert torch.equal(restored(images, SPACE), trained(images, SPACE))


def test_an_unknown_encoder_is_a_clear_error():
    with pytest.raises(ConfigError, match="encoder='image': pick the towers whose biases train, one of both, text"):
        bitfit(encoder="image")


# ------------------------------------------------------------------ the recipes


@pytest.mark.parametrize("experiment, protocol", [("bitfit_few_shot", "few_shot"), ("bitfit_base2new", "base2new")])
@pytest.mark.parametrize("data, epochs", [("dtd", 100), ("oxford_pets", 100), ("imagenet", 10), ("food101", 10)])
def test_experiments_are_the_dassl_recipe_of_clipfits_bias_tuning(tmp_path, experiment, protocol, data, epochs):
    cfg = compose_cfg(tmp_path, [f"experiment={experiment}", f"data={data}"])
    module = cfg.method.module
    assert (cfg.method.name, cfg.protocol.name, cfg.protocol.shots, cfg.trainer.max_epochs) == (
        "bitfit", protocol, 16, epochs)
    assert (cfg.method.batch_size, cfg.method.drop_last, module.encoder, module.layer_norm) == (32, True, "both", True)
    assert module.optimizer._target_ == "torch.optim.SGD"
    assert (module.optimizer.lr, module.optimizer.momentum, module.optimizer.weight_decay) == (2e-3, 0.9, 5e-4)
    assert (module.scheduler.name, module.scheduler.warmup, module.scheduler.warmup_lr) == ("dassl_cosine", 1, 1e-5)
    # CoOp's templates: the data configs' own
    assert templates_for({"name": data, "templates": list(cfg.data.templates)}, cfg.prompt_templates) == tuple(
        cfg.data.templates)
