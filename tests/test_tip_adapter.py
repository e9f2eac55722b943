"""Tip-Adapter and Tip-Adapter-F: the cache logits, the cache itself, alpha and beta searched on validation only,
the trainable keys, checkpoints that evaluate to the same logits, and the reference recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg
from method_contract import assert_loss_falls

import vlm_adapt.methods.tip_adapter as tip
import vlm_adapt.train as train_module
from vlm_adapt.backbones import load_backbone
from vlm_adapt.backbones.towers import normalize
from vlm_adapt.build import build_method
from vlm_adapt.checkpoints import read_checkpoint
from vlm_adapt.data import sample_cache
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.eval.evaluate import evaluate, load_method
from vlm_adapt.methods.tip_adapter import TipAdapter, TipAdapterF, search_alpha_beta, search_grid, tip_logits
from vlm_adapt.train import train

CLASSES = tuple(f"class {i}" for i in range(10))
SPACE = LabelSpace("train", CLASSES, ("a photo of a {}.",))


def trained(make_cfg, monkeypatch, *overrides: str) -> tuple[TipAdapter, dict]:
    """Train on the tiny backbone (2 shots of Imagenette's 10 classes); the trained model and metrics.json."""
    models = []

    def keep(module_cfg, backbone):
        models.append(build_method(module_cfg, backbone))
        return models[-1]

    monkeypatch.setattr(train_module, "build_method", keep)
    cfg = make_cfg(*overrides)
    train(cfg)
    monkeypatch.undo()
    return models[0], json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


# ------------------------------------------------------------------ the formula and the search
def test_logits_are_clip_logits_plus_alpha_times_the_cache_affinity_times_the_values():
    torch.manual_seed(0)
    features, text, keys = (normalize(torch.randn(n, 8)) for n in (3, 4, 6))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    values = F.one_hot(labels, 4).float()
    alpha, beta = 1.7, 5.5
    expected = torch.empty(3, 4)
    for b in range(3):
        for c in range(4):
            cache = sum(math.exp(-beta * (1 - float(features[b] @ keys[n]))) for n in range(6) if labels[n] == c)
            expected[b, c] = 100 * float(features[b] @ text[c]) + alpha * cache
    torch.testing.assert_close(tip_logits(features, text, keys, values, alpha, beta), expected)
    torch.testing.assert_close(tip_logits(features, text, keys, values, torch.tensor(alpha), torch.tensor(beta)),
                               expected)


def test_the_grid_is_the_references():
    betas = search_grid(7.0, 200)
    assert len(betas) == 200 and betas[0] == 0.1 and betas[1] == 1 * (7.0 - 0.1) / 200 + 0.1
    assert betas[-1] == 199 * (7.0 - 0.1) / 200 + 0.1 < 7.0
    assert search_grid(3.0, 20)[10] == 10 * 2.9 / 20 + 0.1


def reference_search(affinity, clip_logits, values, labels, betas, alphas):
    """The reference's loop (utils.py search_hp): beta outer, alpha inner, a strictly better accuracy wins."""
    best, best_beta, best_alpha = 0, 0, 0
    for beta in betas:
        for alpha in alphas:
            logits = clip_logits + ((-1) * (beta - beta * affinity)).exp() @ values * alpha
            acc = 100 * (logits.argmax(1) == labels).float().sum().item() / len(labels)
            if acc > best:
                best, best_beta, best_alpha = acc, beta, alpha
    return best_beta, best_alpha


def test_the_search_picks_what_the_references_loop_picks():
    torch.manual_seed(1)
    features, keys, text = normalize(torch.randn(40, 16)), normalize(torch.randn(30, 16)), normalize(torch.randn(5, 16))
    values = F.one_hot(torch.arange(30) % 5, 5).float()
    labels = torch.randint(0, 5, (40,))
    betas, alphas = search_grid(7.0, 30), search_grid(3.0, 10)
    args = (features @ keys.t(), 100 * features @ text.t(), values, labels, betas, alphas)
    beta, alpha, correct = search_alpha_beta(*args)
    assert (beta, alpha) == reference_search(*args)
    logits = tip_logits(features, text, keys, values, alpha, beta)
    assert correct == int((logits.argmax(1) == labels).sum())


def test_a_validation_split_that_favours_one_grid_point_makes_it_chosen():
    """Four validation images, each with its own cache entry of class 1: two pin alpha to one grid value
    (affinity 1, so beta plays no part), two pin beta (affinity 0) - only (betas[137], alphas[11]) gets all."""
    betas, alphas = search_grid(7.0, 200), search_grid(3.0, 20)
    b, a = betas[137], alphas[11]
    db, da = betas[1] - betas[0], alphas[1] - alphas[0]
    margins = [a - da / 2, a + da / 2, a * math.exp(-(b + db / 2)), a * math.exp(-(b - db / 2))]
    labels = torch.tensor([1, 0, 1, 0])  # class 1 must win for images 0 and 2, lose for 1 and 3
    clip_logits = torch.tensor([[m, 0.0] for m in margins], dtype=torch.float64)
    affinity = torch.full((4, 4), -1000.0, dtype=torch.float64)  # other images' entries contribute nothing
    affinity[range(4), range(4)] = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    values = torch.tensor([[0.0, 1.0]] * 4, dtype=torch.float64)
    assert search_alpha_beta(affinity, clip_logits, values, labels, betas, alphas) == (b, a, 4)


# ------------------------------------------------------------------ trainable parameters
def keys_count(model: TipAdapter, shots: int, classes: int) -> int:
    model.attach_label_spaces(LabelSpace("train", CLASSES[:classes], ("{}",)), [])
    model.allocate_cache(shots * classes, classes)
    assert set(model.checkpoint_state_names()) >= {"cache_keys", "cache_values", "alpha", "beta"}
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_tip_adapter_f_trains_only_the_keys_n_train_x_512_at_vit_b16():
    model = TipAdapterF(load_backbone("ViT-B-16", None))
    assert keys_count(model, 16, 10) == 16 * 10 * 512 == 81_920  # 8,192 x C at 16 shots
    assert model.trainable_parameter_names() == ["cache_keys"]


def test_tip_adapter_f_trains_n_train_x_64_on_tiny_and_tip_adapter_nothing():
    assert keys_count(TipAdapterF(load_backbone("vlm-tiny", None)), 2, 10) == 2 * 10 * 64
    training_free = TipAdapter(load_backbone("vlm-tiny", None))
    assert keys_count(training_free, 2, 10) == 0 and training_free.trainable_parameter_names() == []


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = TipAdapterF(load_backbone("vlm-tiny", None), init_alpha=1.17, init_beta=1.0)
    model.attach_label_spaces(SPACE, [SPACE])
    with torch.no_grad():
        cache = normalize(model.towers.encode_image(torch.randn(20, 3, 64, 64)))
        batch = normalize(model.towers.encode_image(torch.randn(8, 3, 64, 64)))
    model.allocate_cache(20, 10)
    model.cache_keys.data.copy_(cache)
    model.cache_values.copy_(F.one_hot(torch.arange(20) % 10, 10).float())
    model.sample_caches.put("epoch_views", batch, torch.arange(8) % 10, epoch=model.current_epoch)
    indices, labels = torch.arange(8), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    assert model.trainable_parameter_names() == ["cache_keys"]
    assert_loss_falls(model, (indices, labels), lambda params: torch.optim.AdamW(params, lr=1e-2, eps=1e-4),
                      factor=0.9)


# ------------------------------------------------------------------ the cache and the search in a run
def test_the_cache_is_the_normalized_mean_of_ten_augmented_views_of_the_training_images(make_cfg, monkeypatch):
    views = []
    original = sample_cache.encode_view

    def record(*args):
        views.append(original(*args))
        return views[-1]

    monkeypatch.setattr(sample_cache, "encode_view", record)
    model, _ = trained(make_cfg, monkeypatch, "method=tip_adapter", "trainer.limit_test_batches=1")
    assert len(views) == 10 and len(views[0][0]) == 20  # 10 views of 2 shots x 10 classes
    assert not torch.equal(views[0][0], views[1][0])  # the views are augmented
    torch.testing.assert_close(model.cache_keys, normalize(sum(f for f, _ in views) / 10))
    assert torch.equal(model.cache_values, F.one_hot(views[0][1], 10).float())
    datamodule = model.trainer.datamodule
    assert views[0][1].tolist() == [item.label for item in datamodule.train_items]
    keys = model.cache_keys.clone()
    model.build_cache()  # seeded views: the same cache again (every DDP rank builds the same one)
    assert torch.equal(model.cache_keys, keys)


@pytest.mark.parametrize("method, epochs", [("tip_adapter", 1), ("tip_adapter_f", 2)])
def test_alpha_and_beta_are_searched_once_on_the_validation_images_only(make_cfg, monkeypatch, method, epochs):
    calls = []

    def spy(affinity, clip_logits, values, labels, betas, alphas):
        calls.append((labels.clone(), search_alpha_beta(affinity, clip_logits, values, labels, betas, alphas)))
        return calls[-1][1]

    monkeypatch.setattr(tip, "search_alpha_beta", spy)
    model, record = trained(make_cfg, monkeypatch, f"method={method}", f"method.max_epochs={epochs}")
    assert len(calls) == 1  # after the last epoch, never during the test
    labels, (beta, alpha, correct) = calls[0]
    datamodule = model.trainer.datamodule
    assert sorted(labels.tolist()) == sorted(item.label for item in datamodule.val_items)
    assert len(labels) == len(datamodule.val_items) != len(datamodule.test_sets[0][1])
    assert (float(model.alpha), float(model.beta)) == pytest.approx((alpha, beta))
    metrics = record["metrics"]
    assert metrics["val/alpha"] == pytest.approx(alpha) and metrics["val/beta"] == pytest.approx(beta)
    assert metrics["val/acc"] == pytest.approx(100 * correct / len(labels), abs=1e-3)


def test_without_validation_images_alpha_and_beta_keep_their_initial_values(make_cfg, monkeypatch):
    model, record = trained(make_cfg, monkeypatch, "method=tip_adapter", "trainer.limit_val_batches=0",
                            "method.module.init_alpha=2.5", "method.module.init_beta=3.0")
    assert (float(model.alpha), float(model.beta)) == (2.5, 3.0)
    assert record["metrics"]["val/alpha"] == 2.5 and "val/acc" not in record["metrics"]


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("method", ["tip_adapter", "tip_adapter_f"])
def test_a_checkpoint_evaluates_to_the_same_logits(make_cfg, monkeypatch, tmp_path, method):
    model, record = trained(make_cfg, monkeypatch, f"method={method}", "trainer.limit_test_batches=1")
    checkpoint = read_checkpoint(record["checkpoint"])
    assert set(checkpoint["state_dict"]) == {"cache_keys", "cache_values", "alpha", "beta"}
    assert record["cost"]["trainable_params"] == (20 * 64 if method == "tip_adapter_f" else 0)
    space = model.test_label_spaces[0]
    loaded = load_method(checkpoint, None, [space])
    images, _ = next(iter(model.trainer.datamodule.test_dataloader()[0]))
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images, space), model(images, space))
    assert torch.equal(loaded.alpha, model.alpha) and torch.equal(loaded.beta, model.beta)
    evaluated = evaluate(make_cfg(f"ckpt_path={record['checkpoint']}", "loader.num_workers=0",
                                  "loader.eval_batch_size=250", "trainer.accelerator=cpu",
                                  "trainer.limit_test_batches=1", fast=False, config_name="eval", output="eval"))
    assert evaluated["metrics"]["test/imagenette/acc"] == record["metrics"]["test/imagenette/acc"]


def test_another_label_space_is_not_scored():
    model = TipAdapter(load_backbone("vlm-tiny", None))
    other = LabelSpace("other", ("a", "b"), ("{}",))
    model.attach_label_spaces(SPACE, [SPACE, other])
    assert model.supports_label_space(SPACE) and not model.supports_label_space(other)


# ------------------------------------------------------------------ recipes
REFERENCE = {  # gaopengcuhk/Tip-Adapter configs/<dataset>.yaml: init_alpha, init_beta, search_scale, train_epoch
    "caltech101": (3, 1, [12, 5], 20), "dtd": (2, 1, [13, 13], 20), "eurosat": (2, 1, [12, 10], 100),
    "fgvc_aircraft": (5, 1, [30, 30], 20), "food101": (1.17, 1, [10, 10], 20), "imagenet": (1.17, 1, [7, 3], 20),
    "oxford_flowers": (10, 1, [50, 50], 20), "oxford_pets": (1.17, 1, [7, 3], 20),
    "stanford_cars": (3, 1, [20, 10], 20), "sun397": (1.17, 1, [12, 10], 20), "ucf101": (3, 1, [7, 3], 20),
}
IMAGENET_TEMPLATES = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                      "a {} in a video game.", "art of the {}.", "a photo of the small {}."]


@pytest.mark.parametrize("experiment", ["tip_adapter_few_shot", "tip_adapter_f_few_shot"])
@pytest.mark.parametrize("data", sorted(REFERENCE))
def test_experiments_use_each_datasets_reference_config(tmp_path, experiment, data):
    cfg = compose_cfg(tmp_path, [f"experiment={experiment}", f"data={data}"])
    alpha, beta, scale, epochs = REFERENCE[data]
    module = cfg.method.module
    assert (module.init_alpha, module.init_beta, list(module.search_scale)) == (alpha, beta, scale)
    assert (list(module.search_step), module.augment_epoch, list(module.crop_scale)) == ([200, 20], 10, [0.5, 1.0])
    assert module.clip_scale == 100.0 and cfg.protocol.shots == 16 and cfg.method.batch_size == 256
    assert (list(module.templates) if module.templates else None) == (IMAGENET_TEMPLATES if data == "imagenet"
                                                                     else None)
    if experiment == "tip_adapter_f_few_shot":
        assert cfg.trainer.max_epochs == epochs and cfg.method.drop_last is False
        assert module.optimizer._target_ == "torch.optim.AdamW"
        assert (module.optimizer.lr, module.optimizer.eps, module.optimizer.weight_decay) == (1e-3, 1e-4, 0.01)
        assert (module.scheduler.name, module.scheduler.warmup, module.scheduler_interval) == ("cosine", 0, "step")
    else:
        assert cfg.trainer.max_epochs == 1


def test_tip_adapter_f_steps_a_cosine_over_every_step(make_cfg):
    cfg = make_cfg("experiment=tip_adapter_f_few_shot")
    model = build_method(cfg.method.module, load_backbone("vlm-tiny", None))
    model.attach_label_spaces(SPACE, [])
    model.allocate_cache(20, 10)
    model.trainer = type("T", (), {"max_epochs": 20, "estimated_stepping_batches": 20 * 3})()
    config = model.configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step" and scheduler.T_max == 60


def test_tip_adapter_f_resumed_after_a_crash_ends_as_the_uninterrupted_run(make_cfg, monkeypatch):
    """The keys come back from the checkpoint (not rebuilt) and epoch 1's views are drawn from its own seed;
    the reference's per-step cosine schedule resumes where it stopped."""
    from vlm_adapt.divergence import DivergenceGuard

    overrides = ["method=tip_adapter_f", "method.max_epochs=2", "trainer.limit_test_batches=1"]

    def crash_in_second_epoch(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(DivergenceGuard, "on_train_epoch_start", crash_in_second_epoch, raising=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_cfg(*overrides))
    monkeypatch.undo()
    builds = []
    monkeypatch.setattr(TipAdapter, "build_cache", lambda self: builds.append(1))
    train(make_cfg(*overrides))
    monkeypatch.undo()
    train(make_cfg(*overrides, output="plain"))
    resumed, plain = (read_checkpoint(Path(make_cfg(output=o).paths.output_dir) / "checkpoints" / "last.ckpt")
                      for o in ("run", "plain"))
    assert builds == [] and resumed["epoch"] == plain["epoch"] == 1
    for name, tensor in plain["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name
