"""ProGrad: CoOp's 16 context vectors whose CE gradient is projected, every step, off the direction that conflicts
with the gradient of the KL term toward zero-shot CLIP. Only the context trains; the prompt, the zero-shot
classifier, the KL term and the projected gradient Lightning's optimizer steps with equal direct computations of
the reference's formulas (BeierZhu/Prompt-align trainers/prograd.py, Dassl.ProGrad's prograd_backward_and_update);
the experiments carry the reference's recipe."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, compose_cfg
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from vlm_adapt.backbones import load_backbone
from vlm_adapt.build import build_method, to_plain
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.data.templates import templates_for
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.coop import CoOp
from vlm_adapt.methods.prograd import ProGrad, project_conflicting
from vlm_adapt.methods.registry import method_spec

PETS = LabelSpace("oxford_pets", ("abyssinian", "bengal", "pug"), ("a type of pet, a photo of a {}.",))
PHOTO = LabelSpace("toy", ("tench", "goldfish", "church"), ("a photo of a {}.",))
SGD = {"_target_": "torch.optim.SGD", "lr": 0.1}

# BeierZhu/Prompt-align (1b76203) trainers/prograd.py CUSTOM_TEMPLATES, by vlm_adapt's dataset names
REFERENCE_TEMPLATES = {
    "oxford_pets": "a type of pet, a photo of a {}.", "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.", "dtd": "a texture of {}.",
    "eurosat": "a centered satellite photo of {}.", "stanford_cars": "a photo of a {}.",
    "food101": "a type of food, a photo of {}.", "sun397": "a photo of a {}.", "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.", "imagenet": "a photo of a {}.", "imagenet_sketch": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.", "imagenet_a": "a photo of a {}.", "imagenet_r": "a photo of a {}.",
}


def prograd(space: LabelSpace = PETS, **kwargs) -> ProGrad:
    model = ProGrad(load_backbone("vlm-tiny", None, init_seed=1), **kwargs)
    model.attach_label_spaces(space, [space])
    return model


def reference_text_features(model: ProGrad, space: LabelSpace, ctx: torch.Tensor) -> torch.Tensor:
    """The reference PromptLearner + TextEncoder: "X .. X <phrase> <class>." tokenized, [SOS] + ctx + the
    token embeddings after position M, through all 77 positions of open_clip's text tower."""
    clip, m = model.clip, len(ctx)
    phrase = space.templates[0].replace(" {}.", "")
    prefix = " ".join(["X"] * (m - len(phrase.split(" "))) + [phrase])
    tokens = model.tokenizer([f"{prefix} {name}." for name in space.classnames])
    words = clip.token_embedding(tokens)
    x = torch.cat([words[:, :1], ctx.expand(len(tokens), -1, -1), words[:, 1 + m:]], dim=1)
    x = clip.transformer(x + clip.positional_embedding, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)[torch.arange(len(tokens)), tokens.argmax(-1)] @ clip.text_projection
    return F.normalize(x, dim=-1)


def zero_shot_text_features(model: ProGrad, space: LabelSpace) -> torch.Tensor:
    """The reference's zero-shot CLIP: the hand-crafted prompts through open_clip's own encode_text."""
    with torch.no_grad():
        return F.normalize(model.clip.encode_text(model.tokenizer(space.prompts())), dim=-1)


def reference_kl(logits: torch.Tensor, zero_shot: torch.Tensor, t: float) -> torch.Tensor:
    """ProGradLoss: -softmax(z0 / T) * log_softmax(z / T) * T * T, summed over classes, mean over the batch."""
    loss = -F.softmax(zero_shot / t, dim=-1) * F.log_softmax(logits / t, -1) * t * t
    return loss.sum(1).mean()


def test_prograd_is_coop_and_trains_only_the_16_context_vectors():
    model = prograd()
    assert isinstance(model, CoOp) and method_spec("prograd").cls is ProGrad
    assert model.trainable_parameter_names() == ["ctx"] and model.ctx.shape == (16, 64)
    assert all(not p.requires_grad for p in model.clip.parameters())


def test_vit_b16_trains_8192_parameters():
    model = ProGrad(load_backbone("ViT-B-16", None))
    assert model.trainable_parameter_names() == ["ctx"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 16 * 512 == 8_192


def test_context_is_the_references_zeros_then_the_template_phrase_and_the_prompt_its_prompt():
    model = prograd(PETS)
    # "a type of pet, a photo of a": 8 words, 9 tokens ("pet" ","): 8 zeros, then the first 8 tokens' embeddings
    phrase = model.towers.token_embeddings(model.tokenizer(["a type of pet, a photo of a"]))[0, 1:9]
    assert torch.equal(model.ctx.detach()[:8], torch.zeros(8, 64))
    torch.testing.assert_close(model.ctx.detach()[8:], phrase)
    with torch.no_grad():  # any context sits where the reference's does, the last "a" a fixed word after it
        model.ctx.normal_(0, 0.5)
        for space in (PETS, PHOTO):  # every label space is prompted with its own template's phrase
            expected = reference_text_features(model, space, model.ctx)
            torch.testing.assert_close(model.encode_label_space(space), expected, atol=1e-5, rtol=1e-4)


def test_given_words_and_the_random_context():
    words = prograd(PETS, ctx_init="a photo of a")
    torch.testing.assert_close(words.ctx.detach()[12:],
                               words.towers.token_embeddings(words.tokenizer(["a photo of a"]))[0, 1:5])
    tokens, positions = words._tokens(PETS)  # the same words on every label space, whatever its template
    assert torch.equal(tokens, words.tokenizer([f"X X X X X X X X X X X X a photo of a {n}." for n in PETS.classnames]))
    assert torch.equal(positions[0], torch.arange(1, 17))
    random = prograd(PETS, ctx_init=None)
    assert random.ctx.shape == (16, 64) and 0.01 < random.ctx.std().item() < 0.03  # CoOp's N(0, 0.02)
    assert random._tokens(PETS)[0].tolist() == CoOp._tokens(random, PETS)[0].tolist()


def test_a_loaded_context_is_never_initialised_again():
    trained = prograd(PETS)
    with torch.no_grad():
        trained.ctx.normal_()
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == {"ctx"}
    restored = ProGrad(load_backbone("vlm-tiny", None, init_seed=1))  # as load_from_checkpoint: load, then attach
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"], strict=False)
    restored.attach_label_spaces(PETS, [PETS])
    assert torch.equal(restored.ctx, trained.ctx)


def test_zero_shot_logits_are_clips_hand_crafted_prompts_and_the_kl_term_is_the_references():
    model = prograd(PETS, temperature=2.0)
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    out = model.classification_forward((images, labels))
    with torch.no_grad():
        image = F.normalize(model.clip.encode_image(images), dim=-1)
        scale = model.clip.logit_scale.exp()
    expected = scale * image @ zero_shot_text_features(model, PETS).t()
    torch.testing.assert_close(model._zero_shot_logits, expected, atol=1e-5, rtol=1e-4)
    kl = model.kl_loss(out.logits, model._zero_shot_logits)
    torch.testing.assert_close(kl, reference_kl(out.logits, model._zero_shot_logits, 2.0))
    # it is T^2 (KL + the targets' entropy): the KL's gradient
    targets = F.softmax(expected / 2.0, dim=-1)
    true_kl = F.kl_div(F.log_softmax(out.logits / 2.0, dim=-1), targets, reduction="batchmean")
    entropy = -(targets * targets.log()).sum(1).mean()
    torch.testing.assert_close(kl, 4.0 * (true_kl + entropy))
    loss = model.training_loss(out.logits, out.targets, out.text_features)
    torch.testing.assert_close(loss, F.cross_entropy(out.logits, labels))  # the loss the loop backpropagates
    assert [g.shape for g in model._kl_grads] == [model.ctx.shape]


def test_the_projection_is_the_references_and_scale_invariant():
    torch.manual_seed(0)
    a, b = torch.randn(16, 8), torch.randn(16, 8)
    b = b - 2 * (a * b).sum() / (a * a).sum() * a  # make them conflict
    assert (a * b).sum() < 0
    u = b / b.norm()
    update, conflict = project_conflicting(a, b, 0.8)
    assert conflict and torch.allclose(update, a - 0.8 * (a * u).sum() * u, atol=1e-6)
    full, _ = project_conflicting(a, b, 1.0)
    assert abs((full * b).sum().item()) < 1e-4  # lambda 1: orthogonal to g_kl
    scaled, _ = project_conflicting(1024.0 * a, 0.001 * b, 0.8)  # a GradScaler's scale on g_ce, any on g_kl
    torch.testing.assert_close(scaled, 1024.0 * update)
    kept, conflict = project_conflicting(a, -b, 0.8)
    assert not conflict and torch.equal(kept, a)
    assert torch.equal(project_conflicting(a, torch.zeros_like(b), 1.0)[0], a)  # the reference's NaN test: kept


class GradientProbe(L.Callback):
    """The context before each step and the gradient the optimizer steps with (after on_after_backward)."""

    def __init__(self) -> None:
        self.ctx: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ctx.append(pl_module.ctx.detach().clone())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(pl_module.ctx.grad.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(model: ProGrad, images, labels, steps: int, extra_callbacks=(), **trainer_options) -> GradientProbe:
    """`steps` optimizer steps on one batch through Lightning's loop (backward, on_after_backward, step)."""
    probe = GradientProbe()
    loader = DataLoader(TensorDataset(images, labels), batch_size=len(labels))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe, *extra_callbacks],
                        **trainer_options)
    trainer.fit(model, train_dataloaders=loader)
    return probe


def hand_projected_gradient(model: ProGrad, ctx, images, labels, lambda_: float) -> tuple[torch.Tensor, float]:
    """(g_ce - lambda (g_ce . u) u if g_ce . g_kl < 0 else g_ce, g_ce . g_kl) from two autograd.grad calls on
    direct computations of the reference's logits, CE and KL."""
    ctx = ctx.clone().requires_grad_(True)
    with torch.no_grad():
        image = F.normalize(model.clip.encode_image(images), dim=-1)
        zero_shot = model.clip.logit_scale.exp() * image @ model.zero_shot_anchor.features.t()
    logits = model.clip.logit_scale.exp() * image @ reference_text_features(model, PETS, ctx).t()
    (g_ce,) = torch.autograd.grad(F.cross_entropy(logits, labels), ctx, retain_graph=True)
    (g_kl,) = torch.autograd.grad(reference_kl(logits, zero_shot, 1.0), ctx)
    dot = (g_ce * g_kl).sum().item()
    u = g_kl / g_kl.norm()
    return (g_ce - lambda_ * (g_ce * u).sum() * u if dot < 0 else g_ce), dot


def teacher_with_logits(model: ProGrad, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Zero-shot class features F with scale * normalize(f(images)) @ F^T = `logits` (the images' features are
    linearly independent): a zero-shot classifier whose predictions on this batch are chosen."""
    with torch.no_grad():
        image = F.normalize(model.clip.encode_image(images), dim=-1)
        return (torch.linalg.pinv(image) @ (logits / model.clip.logit_scale.exp())).t()


def constructed_case(model: ProGrad, images, labels, conflicting: bool) -> None:
    """Zero-shot predictions p0 = s + a (s - y) (the KL gradient about -a g_ce: conflicting) or
    (1 - a) s + a y (about a g_ce: aligned), s the learned prompt's softmax, plus a little noise so the two
    gradients are not parallel."""
    with torch.no_grad():
        s = model.classification_forward((images, labels)).logits.softmax(-1)
    y = F.one_hot(labels, s.shape[1]).float()
    a = 0.5 * float((s * y).sum(1).min())
    p0 = s + a * (s - y) if conflicting else (1 - a) * s + a * y
    logits = p0.log() + 0.05 * torch.randn_like(p0)
    model.zero_shot_anchor.forget()  # classification_forward stored CLIP's own
    model.zero_shot_anchor.store(PETS, lambda _: teacher_with_logits(model, images, logits))


@pytest.mark.parametrize("conflicting", [True, False])
def test_the_optimizer_steps_with_the_projected_gradient(conflicting):
    model = prograd(PETS, lambda_=0.8, optimizer=SGD)
    torch.manual_seed(0)
    images, labels = torch.randn(3, 3, 64, 64), torch.tensor([0, 1, 2])
    constructed_case(model, images, labels, conflicting)
    probe = fit(model, images, labels, steps=1)
    expected, dot = hand_projected_gradient(model, probe.ctx[0], images, labels, 0.8)
    assert (dot < 0) == conflicting
    atol = 1e-4 * expected.abs().max().item()  # float32 noise of two computation paths (truncated text, chunks)
    torch.testing.assert_close(probe.grads[0], expected, atol=atol, rtol=0)
    torch.testing.assert_close(model.ctx.detach(), probe.ctx[0] - 0.1 * expected, atol=0.1 * atol, rtol=0)  # SGD
    plain, _ = hand_projected_gradient(model, probe.ctx[0], images, labels, 0.0)  # g_ce, unprojected
    assert ((probe.grads[0] - plain).abs().max().item() > 100 * atol) == conflicting


class ScaledGradient(L.Callback):
    """The context's .grad as on_after_backward finds it (callbacks run before the module's projection)."""

    def on_after_backward(self, trainer, pl_module):
        self.grad = pl_module.ctx.grad.detach().clone()


def test_under_a_grad_scaler_the_step_is_the_projection_and_an_overflow_is_skipped():
    """16-mixed: the hook sees g_ce times the scale s; after unscaling the step is the projection, whatever s
    (fp16 autocast on CPU: equal to the fp32 step up to fp16 rounding); an overflow skips the step."""
    torch.manual_seed(0)
    images, labels = torch.randn(3, 3, 64, 64), torch.tensor([0, 1, 2])
    seen, steps, contexts = {}, {}, {}
    for scale in (None, 2.0**4, 2.0**8, 2.0**16):
        model = prograd(PETS, optimizer=SGD)
        torch.manual_seed(1)
        constructed_case(model, images, labels, conflicting=True)
        scaled = ScaledGradient()
        scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
        plugins = [] if scaler is None else [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
        before = model.ctx.detach().clone()
        probe = fit(model, images, labels, steps=1, plugins=plugins, extra_callbacks=[scaled])
        seen[scale], steps[scale], contexts[scale] = scaled.grad, probe.grads[0], (before, model.ctx.detach().clone())
    unscaled = seen[2.0**4] / 2.0**4  # g_ce times the scale, up to fp16 rounding
    torch.testing.assert_close(seen[2.0**8] / 2.0**8, unscaled, rtol=0, atol=1e-3 * unscaled.abs().max().item())
    torch.testing.assert_close(steps[2.0**8], steps[2.0**4], rtol=0, atol=3e-2 * steps[2.0**4].abs().max().item())
    for scale in (2.0**4, 2.0**8):
        assert F.cosine_similarity(steps[scale].flatten(), steps[None].flatten(), dim=0) > 0.99
    before, after = contexts[2.0**16]  # fp16 overflow: non-finite gradients, the scaler skips the step
    assert not torch.isfinite(steps[2.0**16]).all() and torch.equal(before, after)


def test_the_loss_falls_through_the_projected_steps():
    model = prograd(PETS, optimizer={"_target_": "torch.optim.Adam", "lr": 0.01})
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    images = torch.randn(3, 3, 64, 64)[labels] + 0.5 * torch.randn(6, 3, 64, 64)  # one pattern per class
    probe = fit(model, images, labels, steps=20)
    assert sum(probe.losses[-5:]) / 5 < 0.85 * probe.losses[0], probe.losses


def test_bad_options_are_clear_errors():
    for value in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ConfigError, match="lambda_ must be a number in"):
            prograd(lambda_=value)
    for value in (0, -1.0):
        with pytest.raises(ConfigError, match="temperature must be a positive"):
            prograd(temperature=value)
    with pytest.raises(ConfigError, match="CTX_INIT: True"):  # the reference's boolean
        prograd(ctx_init=True)
    with pytest.raises(ConfigError, match="n_ctx must be a positive"):
        prograd(n_ctx=0)
    with pytest.raises(ConfigError, match="set ctx_init=null"):
        prograd(csc=True)
    with pytest.raises(ConfigError, match="set ctx_init=null"):
        prograd(class_token_position="front")
    with pytest.raises(ConfigError, match="prompt_templates=prograd"):  # CoOp's DTD template has no " {}." end
        prograd(LabelSpace("dtd", ("banded", "braided"), ("{} texture.",)))
    with pytest.raises(ConfigError, match="more words than"):
        prograd(PETS, n_ctx=4)
    model = prograd(PHOTO, optimizer=SGD)
    with pytest.raises(ConfigError, match="accumulate_grad_batches=1"):
        fit(model, torch.randn(2, 3, 64, 64), torch.tensor([0, 1]), steps=1, accumulate_grad_batches=2)
    with pytest.raises(RuntimeError, match="KL gradient of this step is missing"):
        model.on_after_backward()


# ------------------------------------------------------------------ the reference's recipes


@pytest.mark.parametrize("experiment, protocol, data, shots, epochs, lambda_", [
    ("prograd_few_shot", "few_shot", "dtd", 1, 50, 1.0),
    ("prograd_few_shot", "few_shot", "dtd", 4, 100, 1.0),
    ("prograd_few_shot", "few_shot", "dtd", 16, 200, 0.8),
    ("prograd_few_shot", "few_shot", "oxford_flowers", 8, 200, 0.8),
    ("prograd_few_shot", "few_shot", "food101", 16, 200, 1.0),
    ("prograd_few_shot", "few_shot", "imagenet", 2, 50, 1.0),
    ("prograd_base2new", "base2new", "oxford_pets", None, 100, 1.0),
    ("prograd_base2new", "base2new", "imagenet", None, 50, 1.0),
    ("prograd_cross_dataset", "cross_dataset", None, None, 50, 1.0),
    ("prograd_domain_generalization", "domain_generalization", None, None, 50, 1.0),
])
def test_experiments_are_the_references_recipe(experiment, protocol, data, shots, epochs, lambda_, tmp_path):
    # configs/trainers/ProGrad/rn50*.yaml, scripts/prograd.sh, base2new_*_prograd.sh, eval.sh, README.md
    overrides = [f"experiment={experiment}"] + ([f"data={data}"] if data else [])
    cfg = compose_cfg(tmp_path, overrides + ([f"protocol.shots={shots}"] if shots else []))
    module = cfg.method.module
    assert (cfg.method.name, cfg.protocol.name, cfg.trainer.max_epochs, module.lambda_) == (
        "prograd", protocol, epochs, lambda_)
    assert cfg.protocol.shots == (shots or 4)
    assert (cfg.method.batch_size, cfg.method.drop_last) == (32, True)
    assert (module.optimizer.lr, module.optimizer.momentum, module.optimizer.weight_decay) == (2e-3, 0.9, 5e-4)
    assert (module.scheduler.name, module.scheduler.warmup, module.scheduler.warmup_lr) == ("dassl_cosine", 1, 1e-5)
    assert (module.n_ctx, module.ctx_init, module.temperature, module.class_token_position, module.csc) == (
        16, "template", 1.0, "end", False)
    assert cfg.prompt_templates == "prograd"


def test_prograd_templates_are_the_references_custom_templates_on_every_dataset():
    for data, template in REFERENCE_TEMPLATES.items():
        dataset = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "data" / f"{data}.yaml"))
        assert templates_for(dataset, "prograd") == (template,), data


def test_method_defaults_are_the_recipe(tmp_path):
    cfg = compose_cfg(tmp_path, ["method=prograd", "backbone=tiny"])
    assert (cfg.method.batch_size, cfg.trainer.max_epochs) == (32, 200)
    model = build_method(cfg.method.module, load_backbone(**to_plain(cfg.backbone)))
    assert isinstance(model, ProGrad) and model.ctx.shape == (16, 64)
    assert (model.lambda_, model.temperature, model.ctx_init) == (1.0, 1.0, "template")


DDP_SCRIPT = '''
import sys
sys.path.insert(0, {tests!r})
import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from test_prograd import SGD, ddp_case


class Save(L.Callback):
    def on_train_batch_start(self, trainer, model, batch, batch_idx):
        self.images, self.ctx = batch[0].clone(), model.ctx.detach().clone()

    def on_after_backward(self, trainer, model):  # before the module's hook: this rank's own g_kl
        self.local_kl = model._kl_grads[0].clone()

    def on_before_optimizer_step(self, trainer, model, optimizer):
        self.grad = model.ctx.grad.clone()

    def on_train_end(self, trainer, model):
        torch.save({{"images": self.images, "ctx": self.ctx, "local_kl": self.local_kl, "grad": self.grad,
                    "after": model.ctx.detach().clone()}}, {out!r} + f"/rank{{trainer.global_rank}}.pt")


model, images, labels = ddp_case()
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[Save()])
trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(images, labels), batch_size=3))
'''


def ddp_case():
    """A ProGrad model, 6 images and labels whose global-batch gradients conflict (the same in every process)."""
    torch.manual_seed(0)
    images, labels = torch.randn(6, 3, 64, 64), torch.tensor([0, 1, 2, 2, 0, 1])
    model = prograd(PETS, optimizer=SGD, lambda_=1.0)
    torch.manual_seed(1)
    constructed_case(model, images, labels, conflicting=True)
    return model, images, labels


@pytest.mark.slow
def test_under_ddp_every_rank_steps_with_the_projection_of_the_global_batch(tmp_path):
    """Two gloo ranks, 3 images each: .grad arrives averaged over the ranks, g_kl is averaged too, so both ranks
    project the global-batch gradients (their own g_kl would give each rank another step)."""
    import subprocess
    import sys

    script = tmp_path / "ddp_prograd.py"
    script.write_text(DDP_SCRIPT.format(tests=str(REPO / "tests"), out=str(tmp_path)))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    model, images, labels = ddp_case()
    order = [next(i for i in range(6) if torch.equal(images[i], image)) for r in ranks for image in r["images"]]
    expected, dot = hand_projected_gradient(model, ranks[0]["ctx"], images[order], labels[order], 1.0)
    assert dot < 0 and sorted(order) == list(range(6))
    for rank in ranks:
        torch.testing.assert_close(rank["grad"], expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
    assert torch.equal(ranks[0]["after"], ranks[1]["after"])
    assert not torch.allclose(ranks[0]["local_kl"], ranks[1]["local_kl"])  # the reduction is what makes them agree
