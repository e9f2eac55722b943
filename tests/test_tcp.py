"""TCP: CoOp's context plus class-aware tokens, TKE(class-level knowledge), inserted at a text block; only the context
and the TKE train (331,904 at ViT-B/16), the text features equal the reference's forward computed block by block,
unseen classes get tokens from their own knowledge, the loss is CE + lambda (1 - mean cos), and the experiments carry
the reference's recipe (htyao89/Textual-based_Class-aware_prompt_tuning)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, compose_cfg
from method_contract import assert_loss_falls
from omegaconf import OmegaConf

from vlm_adapt.backbones import load_backbone
from vlm_adapt.build import build_method, to_plain
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.data.templates import templates_for
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.kgcoop import KgCoOp
from vlm_adapt.methods.registry import method_spec
from vlm_adapt.methods.tcp import TCP

# trainers/tcp.py (bd97bec), Dassl's names as vlm_adapt's: CUSTOM_TEMPLATES_ori (the knowledge prompts) and
# CUSTOM_TEMPLATES (the learned prompts; the context replaces positions 1-4)
REFERENCE_KNOWLEDGE = {
    "oxford_pets": "a photo of a {}, a type of pet.", "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of an aircraft {}.", "dtd": "a photo of a {}, a type of texture.",
    "eurosat": "a centered satellite photo of {}.", "stanford_cars": "a photo of a {}.",
    "food101": "a photo of a {}, a type of food.", "sun397": "a photo of a {}.", "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.", "imagenet": "a photo of a {}.", "imagenet_sketch": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.", "imagenet_a": "a photo of a {}.", "imagenet_r": "a photo of a {}.",
}
REFERENCE_PROMPTS = {
    "oxford_pets": "X X X X {}, a type of pet.", "oxford_flowers": "X X X X {}, a type of flower.",
    "fgvc_aircraft": "X X X X {}, a type of aircraft.", "dtd": "X X X X {} texture.", "eurosat": "X X X X {}.",
    "stanford_cars": "X X X X {}, a type of car", "food101": "X X X X {}, a type of food.", "sun397": "X X X X {}.",
    "caltech101": "X X X X {}.", "ucf101": "a photo of a person doing {}.", "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.", "imagenet_v2": "a photo of a {}.", "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}
PETS = LabelSpace("train", ("abyssinian", "beagle", "pug"), ("a photo of a {}, a type of pet.",))
TRAINABLE = ["ctx", "tke.linear1.weight", "tke.linear1.bias", "tke.linear2.weight", "tke.linear2.bias"]


def tcp(space: LabelSpace = PETS, tests: tuple[LabelSpace, ...] = (), **kwargs) -> TCP:
    """TCP on the 4-block tiny backbone (insertion before block 2 unless told), attached and set up to fit."""
    model = TCP(load_backbone("vlm-tiny", None, init_seed=1), **{"insert_layer": 2, "dataset": "oxford_pets", **kwargs})
    model.attach_label_spaces(space, [space, *tests])
    model.setup("fit")
    return model


def perturbed(model: TCP, seed: int = 0) -> TCP:
    """Move the context and the TKE off their initial values (so no test passes on an initial coincidence)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name in TRAINABLE:
            parameter = model.get_parameter(name)
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def knowledge(model: TCP, prompts: list[str]) -> torch.Tensor:
    """Normalized zero-shot features of the knowledge prompts through open_clip's own text encoder."""
    with torch.no_grad():
        return F.normalize(model.clip.encode_text(model.tokenizer(prompts)), dim=-1)


def reference_tke(model: TCP, k: torch.Tensor) -> torch.Tensor:
    """The reference's meta_net: linear1 - QuickGELU - linear2, reshaped to (C, -1, width)."""
    h = k @ model.tke.linear1.weight.T + model.tke.linear1.bias
    h = h * torch.sigmoid(1.702 * h)
    return (h @ model.tke.linear2.weight.T + model.tke.linear2.bias).reshape(len(k), -1, model.towers.text_width)


def reference_text_features(model: TCP, dataset: str, classnames: tuple[str, ...], layer: int,
                            weight: float) -> torch.Tensor:
    """The reference's PromptLearner + TextEncoder + ResidualAttentionBlock_MaPLe, block by block over all 77
    positions: [SOS] ctx <CUSTOM_TEMPLATES suffix>, and before block `layer` the tokens at 1..4 mixed with the
    class features (w class + (1 - w) x)."""
    clip = model.clip
    class_feature = reference_tke(model, knowledge(model, [REFERENCE_KNOWLEDGE[dataset].format(n) for n in classnames]))
    tokens = model.tokenizer([REFERENCE_PROMPTS[dataset].format(n) for n in classnames])
    embedding = clip.token_embedding(tokens)
    ctx = model.ctx.unsqueeze(0).expand(len(tokens), -1, -1)
    x = torch.cat([embedding[:, :1], ctx, embedding[:, 1 + 4 :]], dim=1) + clip.positional_embedding
    for index, block in enumerate(clip.transformer.resblocks):
        if index == layer:
            n = class_feature.shape[1]
            x = torch.cat([x[:, :1], weight * class_feature + (1 - weight) * x[:, 1 : 1 + n], x[:, 1 + n :]], dim=1)
        x = block(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    return F.normalize(x[torch.arange(len(x)), tokens.argmax(dim=-1)] @ clip.text_projection, dim=-1)


# ------------------------------------------------------------------ what trains
def test_tcp_trains_exactly_the_context_and_the_tke():
    model = tcp()
    assert isinstance(model, KgCoOp) and method_spec("tcp").cls is TCP
    assert model.trainable_parameter_names() == TRAINABLE
    assert model.ctx.shape == (4, 64) and 0.01 < model.ctx.std().item() < 0.03  # N(0, 0.02), CTX_INIT off
    assert model.tke.linear1.weight.shape == (16, 64) and model.tke.linear2.weight.shape == (4 * 64, 16)
    assert type(model.tke.act).__name__ == "QuickGELU"
    assert not any(p.requires_grad for p in model.clip.parameters())
    model.train()
    model.knowledge_guided_loss(model.class_text_features(PETS)).backward()
    assert all(model.get_parameter(name).grad.abs().sum() > 0 for name in TRAINABLE)
    assert all(p.grad is None for p in model.clip.parameters())


def test_vit_b16_trains_331904_parameters():
    model = TCP(load_backbone("ViT-B-16", None))
    assert model.trainable_parameter_names() == TRAINABLE and model.insert_layer == 8
    shapes = {name: tuple(model.get_parameter(name).shape) for name in TRAINABLE}
    assert shapes == {"ctx": (4, 512), "tke.linear1.weight": (128, 512), "tke.linear1.bias": (128,),
                      "tke.linear2.weight": (2048, 128), "tke.linear2.bias": (2048,)}
    # the reference's prompt_learner: ctx 4 x 512, meta_net Linear(512, 128) and Linear(128, 4 x 512), with biases
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == (
        4 * 512 + (512 * 128 + 128) + (128 * 2048 + 2048)) == 331_904


# ------------------------------------------------------------------ the forward
@pytest.mark.parametrize("dataset, layer, weight", [("oxford_pets", 2, 1.0), ("ucf101", 0, 1.0), ("dtd", 3, 0.4)])
def test_text_features_equal_the_references_forward_with_class_tokens_at_the_insertion_block(dataset, layer, weight):
    names = ("banded", "apply eye makeup", "golden retriever")
    space = LabelSpace(dataset, names, ("a photo of a {}.",))  # a test set named after its dataset
    model = perturbed(tcp(PETS, (space,), insert_layer=layer, class_token_weight=weight))
    with torch.no_grad():
        expected = reference_text_features(model, dataset, names, layer, weight)
        torch.testing.assert_close(model.encode_label_space(space), expected, atol=2e-5, rtol=1e-4)
        # the class-aware tokens matter: without them (w = 0 at the same block) the features differ
        assert not torch.allclose(expected, reference_text_features(model, dataset, names, layer, 0.0), atol=1e-3)


def test_unseen_classes_get_class_aware_tokens_from_their_own_knowledge():
    base = LabelSpace("base", ("abyssinian", "beagle"), ("a photo of a {}.",))
    new = LabelSpace("new", ("pug", "sphynx", "boxer"), ("a photo of a {}.",))
    model = perturbed(tcp(base, (new,)))
    assert model.text_anchor.space == base  # the regulariser's t0: the training classes only
    new_knowledge = knowledge(model, [f"a photo of a {n}, a type of pet." for n in new.classnames])
    torch.testing.assert_close(model.class_knowledge(new), new_knowledge, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        tokens = model.class_aware_tokens(new)
        torch.testing.assert_close(tokens, reference_tke(model, new_knowledge))
        assert tokens.shape == (3, 4, 64) and not torch.allclose(tokens[0], tokens[1])
        # class-aware, not position-aware: pug's tokens are the same in any label space that holds pug
        mixed = LabelSpace("oxford_pets", ("beagle", "pug"), ("a photo of a {}.",))
        torch.testing.assert_close(model.class_aware_tokens(mixed)[1], tokens[0])
        torch.testing.assert_close(model.class_aware_tokens(mixed)[0], model.class_aware_tokens(base)[1])
        # the new classes' features are the reference's forward with those tokens, and move with the TKE
        before = model.encode_label_space(new)
        torch.testing.assert_close(before, reference_text_features(model, "oxford_pets", new.classnames, 2, 1.0),
                                   atol=2e-5, rtol=1e-4)
        model.tke.linear2.bias.add_(torch.randn_like(model.tke.linear2.bias))  # not uniform: LayerNorm drops that
        assert not torch.allclose(model.encode_label_space(new), before, atol=1e-4)


def test_the_references_prompts_per_dataset_and_the_fallback():
    model = tcp()
    for dataset, prompt in REFERENCE_PROMPTS.items():
        for space in (LabelSpace("train", ("pug",), ("{}",)), LabelSpace(dataset, ("pug",), ("{}",))):
            model.dataset_name = dataset if space.name == "train" else "oxford_pets"  # a target uses its own name
            ours, reference = model.prompt_tokens(space)[0], model.tokenizer([prompt.format("pug")])[0]
            assert torch.equal(ours[0], reference[0]) and torch.equal(ours[5:], reference[5:]), dataset
            assert model.knowledge_space(space).templates == (REFERENCE_KNOWLEDGE[dataset],)
            model._tcp_tokens.clear()
    unknown = LabelSpace("imagenette", ("tench",), ("itap of a {}.",))  # not in the reference's tables
    assert model.knowledge_space(unknown) == unknown and model.prompt_tail(unknown) == "{}."
    plain = tcp(templates="label_space")
    assert plain.knowledge_space(PETS) == PETS and plain.prompt_tail(PETS) == "{}."


# ------------------------------------------------------------------ the loss
@pytest.mark.parametrize("reg_weight", [8.0, 2.0])
def test_loss_is_ce_plus_lambda_times_one_minus_mean_cos_to_the_knowledge(reg_weight):
    model = perturbed(tcp(reg_weight=reg_weight))
    model.train()
    text = model.class_text_features(PETS)
    k = knowledge(model, [f"a photo of a {n}, a type of pet." for n in PETS.classnames])
    torch.manual_seed(1)
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    cosines = (text * k).sum(-1) / (text.norm(dim=-1) * k.norm(dim=-1))
    expected = F.cross_entropy(logits, labels) + reg_weight * (1.0 - cosines.mean())
    torch.testing.assert_close(model.training_loss(logits, labels, text), expected)
    assert model.knowledge_guided_loss(text).item() > 1e-4


def test_loss_falls_on_a_fixed_batch():
    model = tcp()
    model.train()
    torch.manual_seed(0)
    images, labels = torch.randn(6, 3, 64, 64), torch.tensor([0, 1, 2, 0, 1, 2])
    assert_loss_falls(model, (images, labels), lambda params: torch.optim.Adam(params, lr=0.01))


# ------------------------------------------------------------------ bad options
@pytest.mark.parametrize("options, message", [
    ({"insert_layer": 4}, r"insert_layer must be a text block 0\.\.3 .*4 blocks"),
    ({"insert_layer": -1}, "insert_layer"),
    ({"class_tokens": 5}, r"class_tokens must be 1\.\.n_ctx=4"),
    ({"class_tokens": 0}, "class_tokens"),
    ({"reduction": 0}, r"reduction must be an integer 1\.\.64"),
    ({"reduction": 65}, "reduction"),
    ({"class_token_weight": 1.5}, r"class_token_weight .* \[0, 1\]"),
    ({"reg_weight": -1.0}, "reg_weight"),
    ({"templates": "coop"}, "templates must be one of"),
    ({"csc": True}, "csc false"),
    ({"class_token_position": "middle"}, "class_token_position must be end"),
])
def test_bad_options_are_refused_with_the_fix(options, message):
    with pytest.raises(ConfigError, match=message):
        TCP(load_backbone("vlm-tiny", None, init_seed=1), **{"insert_layer": 2, **options})


# ------------------------------------------------------------------ the reference's recipes
@pytest.mark.parametrize("experiment, protocol, data, shots, epochs", [
    ("tcp_base2new", "base2new", "dtd", 16, 50),
    ("tcp_base2new", "base2new", "imagenet", 16, 25),
    ("tcp_base2new", "base2new", "sun397", 16, 25),
    ("tcp_few_shot", "few_shot", "eurosat", 4, 50),
    ("tcp_cross_dataset", "cross_dataset", None, 16, 25),
    ("tcp_domain_generalization", "domain_generalization", None, 16, 25),
])
def test_experiments_are_the_references_recipe(experiment, protocol, data, shots, epochs, tmp_path):
    # configs/trainers/TCP/vit_b16_ep100_ctxv1.yaml, scripts/base2new_train.sh, train.py (25 epochs: ImageNet, SUN397)
    cfg = compose_cfg(tmp_path, [f"experiment={experiment}", *([f"data={data}"] if data else [])])
    module, optimizer, scheduler = cfg.method.module, cfg.method.module.optimizer, cfg.method.module.scheduler
    assert (cfg.method.name, cfg.protocol.name, cfg.protocol.shots) == ("tcp", protocol, shots)
    assert (cfg.data.name, module.dataset) == (data or "imagenet", data or "imagenet")
    assert (cfg.method.batch_size, cfg.trainer.max_epochs, cfg.method.drop_last) == (32, epochs, True)
    assert optimizer._target_ == "torch.optim.Adam"
    assert (optimizer.lr, list(optimizer.betas), optimizer.eps, optimizer.weight_decay) == (
        2e-3, [0.9, 0.999], 1e-3, 5e-4)
    assert (scheduler.name, scheduler.warmup, scheduler.warmup_lr) == ("dassl_cosine", 1, 1e-5)
    assert (module.n_ctx, module.ctx_init, module.class_tokens, module.reduction) == (4, None, 4, 4)
    assert (module.insert_layer, module.class_token_weight, module.reg_weight, module.templates) == (
        8, 1.0, 8.0, "reference")


def test_method_config_builds_the_model_it_describes(tmp_path):
    cfg = compose_cfg(tmp_path, ["method=tcp", "backbone=tiny", "data=dtd", "method.module.insert_layer=3"])
    model = build_method(cfg.method.module, load_backbone(**to_plain(cfg.backbone)))
    assert isinstance(model, TCP) and model.trainable_parameter_names() == TRAINABLE
    assert (model.insert_layer, model.class_tokens, model.reg_weight, model.dataset_name) == (3, 4, 8.0, "dtd")
    assert model.knowledge_space(LabelSpace("base", ("banded",), ("{} texture.",))).templates == (
        "a photo of a {}, a type of texture.",)


def test_the_knowledge_templates_are_a_template_set_differing_from_coops_on_three_datasets():
    differing = set()
    for data, template in REFERENCE_KNOWLEDGE.items():
        path = REPO / "conf" / "data" / f"{data}.yaml"
        if not path.is_file():  # the ImageNet variants are targets, configured under conf/data/imagenet_variants
            continue
        dataset = OmegaConf.to_container(OmegaConf.load(path))
        assert templates_for(dataset, "tcp") == (template,), data
        if templates_for(dataset, "dataset") != (template,):
            differing.add(data)
    assert differing == {"fgvc_aircraft", "dtd", "food101"}
