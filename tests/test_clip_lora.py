"""CLIP-LoRA: rank-2 LoRA on q, k, v of every attention layer of both towers (MaxZanella/CLIP-LoRA). Only the
LoRA matrices train (184,320 at ViT-B/16), the frozen path is open_clip's own, the update is
W x + alpha / sqrt(r) B A dropout(x) with dropout on the LoRA input in training only, the loss falls,
checkpoints round-trip, bad options are named, and the configs carry the reference's recipe."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg
from method_contract import assert_loss_falls, train_then_evaluate

import vlm_adapt.config  # noqa: F401  (registers the resolvers the composed config uses)
from vlm_adapt.backbones import CLIPTowers, load_backbone
from vlm_adapt.backbones.lora import LoRAMultiheadAttention, inject_lora, lora_modules, position_indices
from vlm_adapt.build import build_method, to_plain
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.data.templates import templates_for
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.clip_lora import CLIPLoRA
from vlm_adapt.methods.registry import method_spec
from vlm_adapt.methods.schedulers import build_scheduler

SPACE = LabelSpace("toy", ("tench", "goldfish", "church", "parachute"), ("a photo of a {}.",))
PROMPTS = [f"a photo of a {name}." for name in SPACE.classnames]


def lora(seed: int = 0, **kwargs) -> CLIPLoRA:
    torch.manual_seed(seed)  # the initialisation of A
    model = CLIPLoRA(load_backbone("vlm-tiny", None, init_seed=1), **kwargs)
    model.attach_label_spaces(SPACE, [SPACE])
    return model


def randomize_b(model_or_layer, seed: int = 1, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    layers = [model_or_layer] if isinstance(model_or_layer, LoRAMultiheadAttention) else lora_modules(model_or_layer)
    with torch.no_grad():
        for layer in layers:
            for B in layer.lora_B.values():
                B.copy_(torch.randn(B.shape, generator=g) * std)


def lora_names(widths: dict[str, int], layers: int, params: str = "qkv") -> set[str]:
    towers = {"vision": "clip.visual.transformer", "text": "clip.transformer"}
    return {f"{towers[t]}.resblocks.{i}.attn.lora_{m}.{p}" for t in widths for i in range(layers)
            for m in "AB" for p in params}


# ------------------------------------------------------------------ what trains


def test_vit_b16_trains_exactly_the_184320_lora_parameters():
    model = CLIPLoRA(load_backbone("ViT-B-16", None))
    assert method_spec("clip_lora").cls is CLIPLoRA and method_spec("clip_lora").tasks == ("classification",)
    assert set(model.trainable_parameter_names()) == lora_names({"vision": 768, "text": 512}, 12)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == (
        12 * 3 * (2 * 768 + 768 * 2) + 12 * 3 * (2 * 512 + 512 * 2)) == 184_320
    named = dict(model.named_parameters())
    assert named["clip.visual.transformer.resblocks.0.attn.lora_A.q"].shape == (2, 768)
    assert named["clip.visual.transformer.resblocks.0.attn.lora_B.q"].shape == (768, 2)
    assert named["clip.transformer.resblocks.11.attn.lora_A.v"].shape == (2, 512)
    assert all(isinstance(block.attn, LoRAMultiheadAttention) for block in model.clip.visual.transformer.resblocks)
    assert all(isinstance(block.attn, LoRAMultiheadAttention) for block in model.clip.transformer.resblocks)


def test_initialisation_is_the_references_a_kaiming_uniform_b_zero_scale_alpha_over_sqrt_r():
    model = lora()
    layer = model.clip.visual.transformer.resblocks[0].attn
    assert layer.scaling == 1 / math.sqrt(2) and layer.lora_dropout.p == 0.25 and layer.params == ("q", "k", "v")
    for p in "qkv":
        assert torch.equal(layer.lora_B[p], torch.zeros(64, 2))
        bound = 1 / math.sqrt(64)  # nn.Linear's weight init: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), ..)
        assert layer.lora_A[p].abs().max() <= bound and layer.lora_A[p].std() > bound / 3
    assert lora(r=4, alpha=2.0).clip.transformer.resblocks[0].attn.scaling == 1.0


def test_positions_encoders_and_params_choose_the_layers():
    # loralib/utils.py INDEX_POSITIONS_TEXT / INDEX_POSITIONS_VISION['ViT-B/16'] at 12 layers
    reference = {"bottom": [0, 1, 2, 3], "mid": [4, 5, 6, 7], "up": [8, 9, 10, 11], "half-up": [6, 7, 8, 9, 10, 11],
                 "half-bottom": [0, 1, 2, 3, 4, 5], "all": list(range(12)), "top3": [9, 10, 11]}
    assert {position: position_indices(position, 12) for position in reference} == reference
    # ViT-L/14's 24 vision layers (the positions the reference defines for it)
    assert position_indices("half-up", 24) == list(range(12, 24)) and position_indices("all", 24) == list(range(24))
    model = lora(encoder="vision", position="half-up", params=["q", "o"])
    assert set(model.trainable_parameter_names()) == {
        f"clip.visual.transformer.resblocks.{i}.attn.lora_{m}.{p}" for i in (2, 3) for m in "AB" for p in "qo"}
    assert not model.text_features_need_grad() and model.image_features_need_grad()
    text_only = lora(encoder="text")
    assert text_only.text_features_need_grad() and not text_only.image_features_need_grad()
    with pytest.raises(ConfigError, match="already has LoRA"):
        inject_lora(model.clip, encoder="vision", position="all")


# ------------------------------------------------------------------ exactness


def test_with_b_zero_the_towers_are_open_clips_own():
    model = lora().eval()
    plain = load_backbone("vlm-tiny", None, init_seed=1).model.eval()
    images = torch.randn(3, 3, 64, 64)
    tokens = model.tokenizer(PROMPTS)
    # with autograd on, nn.MultiheadAttention runs torch's reference path: the wrapper is the same computation
    assert torch.equal(model.clip.encode_image(images), plain.encode_image(images))
    assert torch.equal(model.clip.encode_text(tokens), plain.encode_text(tokens))
    assert torch.equal(model.towers.encode_image(images), CLIPTowers(plain).encode_image(images))
    assert torch.equal(model.towers.encode_text(tokens), CLIPTowers(plain).encode_text(tokens))
    with torch.no_grad():  # here nn.MultiheadAttention picks its fused inference kernel: equal to rounding
        torch.testing.assert_close(model.encode_images(images), plain.encode_image(images))
        torch.testing.assert_close(model.encode_prompts(PROMPTS), plain.encode_text(tokens))


def merged_attention(layer: LoRAMultiheadAttention) -> torch.nn.MultiheadAttention:
    """An nn.MultiheadAttention whose weights are W + alpha / sqrt(r) B A (the reference merges so in eval)."""
    base = layer.base
    merged = torch.nn.MultiheadAttention(base.embed_dim, base.num_heads, batch_first=True)
    merged.load_state_dict(base.state_dict())
    width = base.embed_dim
    with torch.no_grad():
        for i, p in enumerate("qkv"):
            if p in layer.lora_A:
                merged.in_proj_weight[i * width:(i + 1) * width] += layer.scaling * layer.lora_B[p] @ layer.lora_A[p]
        if "o" in layer.lora_A:
            merged.out_proj.weight += layer.scaling * layer.lora_B["o"] @ layer.lora_A["o"]
    return merged


@pytest.mark.parametrize("params", [["q", "k", "v"], ["q", "k", "v", "o"], ["v"]])
def test_nonzero_b_attention_is_w_x_plus_scaled_b_a_x(params):
    model = lora(params=params).eval()
    randomize_b(model)
    x = torch.randn(3, 9, 64)
    mask = torch.full((9, 9), float("-inf")).triu(1)  # the text tower's causal mask
    for layer, attn_mask in ((model.clip.visual.transformer.resblocks[1].attn, None),
                             (model.clip.transformer.resblocks[2].attn, mask)):
        expected = merged_attention(layer)(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
        torch.testing.assert_close(layer(x, x, x, need_weights=False, attn_mask=attn_mask)[0], expected)
        # a boolean mask (True = not allowed, as nn.MultiheadAttention reads it) gives the same
        if attn_mask is not None:
            torch.testing.assert_close(layer(x, x, x, need_weights=False, attn_mask=mask.isinf())[0], expected)
            per_head = mask.expand(3 * layer.base.num_heads, 9, 9)  # a 3-D mask, (N x heads, T, S)
            torch.testing.assert_close(layer(x, x, x, need_weights=False, attn_mask=per_head)[0], expected)
    # the q projection itself: W_q x + b_q + s B_q A_q x
    layer = model.clip.visual.transformer.resblocks[1].attn
    if "q" in params:
        w, b = layer.base.in_proj_weight[:64], layer.base.in_proj_bias[:64]
        direct = x @ w.t() + b + layer.scaling * x @ (layer.lora_B["q"] @ layer.lora_A["q"]).t()
        torch.testing.assert_close(F.linear(x, w, b) + layer.lora_delta("q", x), direct)


def test_cross_attention_projects_query_key_and_value_separately():
    layer = lora().eval().clip.visual.transformer.resblocks[0].attn
    randomize_b(layer)
    q, kv = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    torch.testing.assert_close(layer(q, kv, kv, need_weights=False)[0],
                               merged_attention(layer)(q, kv, kv, need_weights=False)[0])
    with pytest.raises(NotImplementedError, match="need_weights=False"):
        layer(q, kv, kv)


def test_dropout_acts_only_in_training_and_only_on_each_projections_lora_input():
    model = lora(dropout=0.5)
    layer = model.clip.visual.transformer.resblocks[0].attn
    x = torch.randn(2, 6, 64)
    frozen = layer.eval()(x, x, x, need_weights=False)[0]
    # B = 0: the frozen path is untouched by the dropout, in training too
    model.train()
    assert torch.equal(layer(x, x, x, need_weights=False)[0], frozen)
    torch.testing.assert_close(frozen, layer.base(x, x, x, need_weights=False)[0])
    randomize_b(layer)
    torch.manual_seed(7)
    trained = layer(x, x, x, need_weights=False)[0]
    torch.manual_seed(7)
    dropped = [F.dropout(x, 0.5, training=True) for _ in "qkv"]  # one independent mask per projection
    assert not torch.equal(dropped[0], dropped[1])
    w, b = layer.base.in_proj_weight.chunk(3), layer.base.in_proj_bias.chunk(3)
    q, k, v = (F.linear(x, w[i], b[i]) + layer.scaling * F.linear(F.linear(dropped[i], layer.lora_A[p]),
                                                                   layer.lora_B[p])
               for i, p in enumerate("qkv"))
    q, k, v = (t.reshape(2, 6, 2, 32).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 6, 64)
    torch.testing.assert_close(trained, F.linear(out, layer.base.out_proj.weight, layer.base.out_proj.bias))
    assert not torch.equal(layer(x, x, x, need_weights=False)[0], trained)  # new masks each call
    model.eval()
    first = layer(x, x, x, need_weights=False)[0]
    assert torch.equal(first, layer(x, x, x, need_weights=False)[0])
    torch.testing.assert_close(first, merged_attention(layer)(x, x, x, need_weights=False)[0])


def test_logits_are_100_times_the_cosine_against_prompts_through_the_adapted_text_tower():
    model = lora().eval()
    randomize_b(model)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        image = F.normalize(model.clip.encode_image(images), dim=-1)
        text = F.normalize(model.clip.encode_text(model.tokenizer(PROMPTS)), dim=-1)
        torch.testing.assert_close(model(images, SPACE), 100.0 * image @ text.t(), atol=1e-4, rtol=1e-5)
        learned = lora(logit_scale=None).eval()
        randomize_b(learned)
        torch.testing.assert_close(learned(images, SPACE), learned.clip.logit_scale.exp() * image @ text.t(),
                                   atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------ training


def test_loss_falls_and_gradients_reach_only_the_lora_matrices():
    model = lora().train()
    images, labels = torch.randn(4, 3, 64, 64), torch.arange(4)
    out = model.classification_forward((images, labels))
    assert out.text_features.requires_grad  # the prompts are re-encoded with gradients every step
    assert_loss_falls(model, (images, labels), lambda params: torch.optim.AdamW(params, lr=2e-2), steps=8)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_checkpoint_round_trip_gives_identical_logits():
    trained = lora(seed=0)
    randomize_b(trained)
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == lora_names({"vision": 64, "text": 64}, 4)
    restored = lora(seed=1)  # other A, B = 0: overwritten by the checkpoint
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(lora(seed=1).eval()(images, SPACE), trained.eval()(images, SPACE))
        restored.on_load_checkpoint(checkpoint)
        restored.load_state_dict(checkpoint["state_dict"], strict=False)
        assert torch.equal(restored.eval()(images, SPACE), trained(images, SPACE))


def test_a_run_and_its_checkpoint_give_the_same_accuracy(make_cfg, tmp_path):
    record, evaluated = train_then_evaluate(make_cfg, tmp_path, "method=clip_lora", "trainer.limit_test_batches=1")
    assert record["status"] == "completed" and record["method"] == "clip_lora"
    assert record["cost"]["trainable_params"] == 8 * 3 * (2 * 64 + 64 * 2)
    checkpoint = torch.load(record["checkpoint"], weights_only=True)
    assert set(checkpoint["state_dict"]) == lora_names({"vision": 64, "text": 64}, 4)
    assert evaluated["metrics"]["test/imagenette/acc"] == record["metrics"]["test/imagenette/acc"]


@pytest.mark.parametrize("option, value, allowed", [
    ("encoder", "image", "text, vision, both"),
    ("position", "top", "all, bottom, mid, up, half-up, half-bottom, top3"),
    ("params", ["q", "x"], "q, k, v, o"),
    ("params", [], "q, k, v, o"),
    ("params", "qkv", "q, k, v, o"),
    ("params", ["q", "q"], "without repeats"),
    ("r", 0, ">= 1"),
    ("r", -2, ">= 1"),
    ("dropout", 1.0, r"\[0, 1\)"),
    ("alpha", 0, "> 0"),
    ("logit_scale", 0.0, "positive"),
])
def test_bad_options_name_the_option_and_the_allowed_values(option, value, allowed):
    with pytest.raises(ConfigError, match=rf"method\.module\.{option}=.*{allowed}"):
        CLIPLoRA(load_backbone("vlm-tiny", None), **{option: value})


# ------------------------------------------------------------------ the reference's recipe


def test_cosine_ends_at_eta_min_per_step_as_the_references_cosine_annealing():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=2e-4)
    scheduler = build_scheduler(optimizer, {"name": "cosine", "warmup": 0, "eta_min": 1e-6}, 10)
    rates = []
    for _ in range(11):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-6 + (2e-4 - 1e-6) * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(11)]
    assert rates == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("data, shots", [("dtd", 1), ("dtd", 4), ("eurosat", 16), ("imagenet", 16)])
def test_few_shot_experiment_is_the_references_recipe(data, shots, tmp_path):
    cfg = compose_cfg(tmp_path, ["experiment=clip_lora_few_shot", f"data={data}", f"protocol.shots={shots}"])
    module = cfg.method.module
    assert (cfg.method.name, cfg.protocol.name, cfg.protocol.shots) == ("clip_lora", "few_shot", shots)
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs) == (500 * shots, -1)
    assert (cfg.method.batch_size, cfg.method.drop_last) == (32, False)
    assert (module.encoder, module.position, list(module.params)) == ("both", "all", ["q", "k", "v"])
    assert (module.r, module.alpha, module.dropout, module.logit_scale) == (2, 1, 0.25, 100.0)
    assert module.optimizer._target_ == "torch.optim.AdamW"
    assert (module.optimizer.lr, module.optimizer.weight_decay, list(module.optimizer.betas)) == (2e-4, 1e-2,
                                                                                                  [0.9, 0.999])
    assert (module.scheduler.name, module.scheduler.warmup, module.scheduler.eta_min) == ("cosine", 0, 1e-6)
    assert module.scheduler_interval == "step"


@pytest.mark.parametrize("data", ["caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "imagenet",
                                  "oxford_flowers", "oxford_pets", "stanford_cars", "sun397", "ucf101"])
def test_every_dataset_is_prompted_with_the_references_template(data, tmp_path):
    cfg = compose_cfg(tmp_path, ["experiment=clip_lora_few_shot", f"data={data}"])
    assert templates_for({"name": data, "templates": list(cfg.data.templates)}, cfg.prompt_templates) == (
        "a photo of a {}.",)


def test_method_defaults_are_the_recipe(tmp_path):
    cfg = compose_cfg(tmp_path, ["method=clip_lora", "backbone=tiny"])
    assert (cfg.method.batch_size, cfg.protocol.shots, cfg.trainer.max_steps, cfg.trainer.max_epochs) == (
        32, 16, 8000, -1)
    model = build_method(cfg.method.module, load_backbone(**to_plain(cfg.backbone)))
    assert isinstance(model, CLIPLoRA) and len(lora_modules(model.clip)) == 8
    assert model.hparams.scheduler == {"name": "cosine", "warmup": 0, "eta_min": 1e-6}
    assert model.hparams.scheduler_interval == "step"
