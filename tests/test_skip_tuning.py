"""Skip Tuning: the cached step equals the full-model step, CSkip keeps what it must, exactly the top
layers train, the epoch cache holds no graph and does not grow, token dropping keeps the class token,
single-class batches, an end-to-end run that learns, and the recipes."""

import json
import math
import weakref

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from vlm_adapt.backbones import load_backbone
from vlm_adapt.build import build_backbone, build_datamodule, build_method
from vlm_adapt.data.datasets import ImageListDataset
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.data.samplers import SingleClassBatchSampler, single_class_batches
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.skip_tuning import ClassSkipper, SkipTuning, drop_patch_tokens, rank_keep_probabilities
from vlm_adapt.train import train

# class names of different lengths and two templates: the prompt cache truncates and averages templates
TRAIN = LabelSpace(
    "train",
    ("tench", "english springer spaniel", "cassette player", "church", "french horn", "golf ball"),
    ("a photo of a {}.", "a blurry photo of the big {}."),
)
OPTIMIZER = {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9}


def skip_tuning(**kwargs) -> SkipTuning:
    torch.manual_seed(0)
    model = SkipTuning(load_backbone("vlm-tiny", None), start_layer=2, optimizer=OPTIMIZER, **kwargs)
    model.attach_label_spaces(TRAIN, [TRAIN])
    model.cache_class_prompts()
    return model.train()


def trainable(model: SkipTuning) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def test_cached_step_gives_the_full_model_loss_and_gradients():
    model = skip_tuning(class_skipping=False, drop_ratio=0.0)
    images, labels = torch.randn(5, 3, 64, 64), torch.tensor([0, 1, 2, 5, 1])

    text = model.encode_label_space(TRAIN)  # full text tower, layers 0..w-1 frozen
    full_loss = F.cross_entropy(model.logits(model.encode_images(images), text), labels)
    full_grads = torch.autograd.grad(full_loss, trainable(model))

    cached_loss, classes, _ = model.cached_loss(model.frozen_image_tokens(images), labels)
    cached_grads = torch.autograd.grad(cached_loss, trainable(model))

    assert classes.tolist() == list(range(TRAIN.num_classes))
    torch.testing.assert_close(cached_loss, full_loss, rtol=1e-5, atol=1e-6)
    for (name, _), full, cached in zip(
        ((n, p) for n, p in model.named_parameters() if p.requires_grad), full_grads, cached_grads
    ):
        assert full.abs().sum() > 0, name
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-6, msg=name)


def test_class_skipping_keeps_true_classes_and_top_k_and_remaps_labels():
    torch.manual_seed(1)
    num_classes, dim = 30, 16
    skipper = ClassSkipper(num_classes, top_ratio=0.5, max_top=6, scale=0.3, keep_mask="batch")
    assert skipper.num_top == 6  # min(ceil(0.5 * 30), 6)
    prototypes = F.normalize(torch.randn(num_classes, dim), dim=-1)
    sizes = set()
    for _ in range(200):
        labels = torch.randint(0, num_classes, (8,))  # up to 8 true classes: more than K
        features = torch.randn(8, dim)
        kept, targets = skipper.select(features, prototypes, labels)
        scores = F.normalize(features, dim=-1) @ prototypes.t()
        scores[torch.arange(8), labels] = float("inf")
        ranked = scores.max(dim=0).values.argsort(descending=True)
        assert set(labels.tolist()) <= set(kept.tolist())
        assert set(ranked[:6].tolist()) <= set(kept.tolist())
        assert ranked[-1].item() not in kept.tolist() or ranked[-1].item() in labels.tolist()  # p = 0 last
        assert torch.equal(kept, kept.unique())  # sorted, no repeats
        assert torch.equal(kept[targets], labels)
        sizes.add(len(kept))
    assert len(sizes) > 1  # the tail is sampled per batch


def test_keep_probabilities_and_the_reference_single_mask():
    probabilities = rank_keep_probabilities(10, 3, 0.3)
    x = torch.linspace(0, 5, 7, dtype=torch.float64)
    expected = (torch.exp(-x / 0.3) - math.exp(-5 / 0.3)) / (1 - math.exp(-5 / 0.3))
    torch.testing.assert_close(probabilities, torch.cat([torch.ones(3), expected.float()]))
    once = ClassSkipper(40, top_ratio=0.5, max_top=5, scale=0.3, keep_mask="once")
    assert all(torch.equal(once.rank_mask(), once.rank_mask()) for _ in range(5))
    per_batch = ClassSkipper(40, top_ratio=0.5, max_top=5, scale=0.3, keep_mask="batch")
    assert any(not torch.equal(per_batch.rank_mask(), per_batch.rank_mask()) for _ in range(5))


def test_kept_class_text_features_match_the_full_text_tower():
    model = skip_tuning()
    classes = torch.tensor([1, 3, 4])
    with torch.no_grad():
        full = model.encode_label_space(TRAIN)[classes]
        torch.testing.assert_close(model.cached_class_features(classes), full, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.class_prototypes, model.encode_label_space(TRAIN), rtol=1e-5, atol=1e-6)


def expected_trainable_names(model: SkipTuning, start: int) -> set[str]:
    names = {"clip.text_projection", "clip.visual.proj"}
    for prefix in ("clip.ln_final", "clip.visual.ln_post"):
        names |= {f"{prefix}.weight", f"{prefix}.bias"}
    for tower in ("clip.transformer", "clip.visual.transformer"):
        for i in range(start, 4):
            names |= {f"{tower}.resblocks.{i}.{n}" for n, _ in model.get_submodule(f"{tower}.resblocks.{i}")
                      .named_parameters()}
    return names


def test_exactly_the_top_layers_and_heads_train():
    model = skip_tuning()
    assert set(model.trainable_parameter_names()) == expected_trainable_names(model, 2)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for name in ("clip.token_embedding.weight", "clip.positional_embedding", "clip.logit_scale",
                 "clip.visual.class_embedding", "clip.visual.positional_embedding", "clip.visual.conv1.weight",
                 "clip.visual.ln_pre.weight", "clip.transformer.resblocks.1.attn.in_proj_weight",
                 "clip.visual.transformer.resblocks.1.mlp.c_fc.weight"):
        assert name in frozen


@pytest.mark.parametrize("start_layer", [0, 4, -1])
def test_start_layer_outside_1_to_L_minus_1_is_a_config_error(start_layer):
    with pytest.raises(ConfigError, match="start_layer"):
        SkipTuning(load_backbone("vlm-tiny", None), start_layer=start_layer)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="drop_ratio.*keep_mask"):
        SkipTuning(load_backbone("vlm-tiny", None), start_layer=2, drop_ratio=1.5, keep_mask="sometimes")


def test_epoch_cache_has_no_graph_is_replaced_and_reads_each_image_once_per_epoch(make_cfg):
    cfg = make_cfg("method=skip_tuning", "method.module.start_layer=2")
    datamodule = build_datamodule(cfg)
    backbone = build_backbone(cfg)
    datamodule.set_preprocessing(backbone.model.visual.preprocess_cfg)
    calls = []
    augment = datamodule.train_transform_fn
    datamodule.train_transform_fn = lambda image: calls.append(1) or augment(image)
    model = build_method(cfg.method.module, backbone)
    model.attach_label_spaces(datamodule.train_label_space, datamodule.test_label_spaces)

    class Recorder(L.Callback):
        def __init__(self):
            self.epochs = []

        def on_train_epoch_end(self, trainer, pl_module):
            cache = pl_module.sample_caches.built("layer_w_tokens").values
            self.epochs.append({
                "ref": weakref.ref(cache), "shape": tuple(cache.shape), "device": cache.device.type,
                "requires_grad": cache.requires_grad, "grad_fn": cache.grad_fn, "images_read": len(calls),
                "sample": cache[:2].clone(),
            })

    recorder = Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[recorder])
    trainer.fit(model, datamodule=datamodule)

    first, second = recorder.epochs
    n = len(datamodule.train_items)
    assert first["shape"] == second["shape"] == (n, 17, 64)  # 16 patches + class token, width 64
    assert first["device"] == "cpu"
    assert not first["requires_grad"] and first["grad_fn"] is None and second["grad_fn"] is None
    assert first["ref"]() is None  # epoch 1's tokens were released, not kept beside epoch 2's
    assert (first["images_read"], second["images_read"]) == (n, 2 * n)  # once per image per epoch
    assert not torch.allclose(first["sample"], second["sample"])  # each epoch has its own augmentation


def test_token_dropping_never_drops_the_class_token():
    torch.manual_seed(0)
    tokens = torch.arange(17.0).view(1, 17, 1).expand(3, 17, 4).clone()  # token i holds the value i
    counts = set()
    for _ in range(300):
        out = drop_patch_tokens(tokens, 0.9)
        assert torch.equal(out[:, 0], tokens[:, 0])
        patches = out[0, 1:, 0]
        assert (patches >= 1).all() and torch.equal(patches, patches.unique())  # kept patches, in order
        assert out.shape[1] - 1 >= 16 - math.ceil(0.9 * 16)
        counts.add(out.shape[1])
    assert len(counts) > 3  # the ratio is drawn per batch
    assert torch.equal(drop_patch_tokens(tokens, 0.0), tokens)


def test_single_class_batch_sampler():
    labels = [0] * 8 + [1] * 8 + [2] * 6
    sampler = SingleClassBatchSampler(labels, batch_size=4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 + 2 + 2
    assert all(len({labels[i] for i in batch}) == 1 and len(batch) <= 4 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(len(labels)))
    assert any(list(sampler) != batches for _ in range(5))  # reshuffled every epoch


def test_single_class_batch_sampler_drops_each_classs_partial_batch_like_the_reference():
    labels = [0] * 9 + [1] * 8 + [2] * 3  # class 2 is smaller than a batch: it keeps its only batch
    sampler = SingleClassBatchSampler(labels, batch_size=4, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 + 2 + 1
    assert sorted(len(batch) for batch in batches) == [3, 4, 4, 4, 4]
    assert len({i for batch in batches for i in batch if labels[i] == 0}) == 8


def test_single_class_batches_only_from_four_shots():
    dataset = ImageListDataset([], ".", None)
    dataset.items = [type("Item", (), {"label": i % 5})() for i in range(15)]  # 3 shots per class
    assert single_class_batches(dataset, batch_size=4, min_shots=4) is None
    dataset.items = [type("Item", (), {"label": i % 5})() for i in range(20)]  # 4 shots per class
    assert isinstance(single_class_batches(dataset, batch_size=4, min_shots=4), SingleClassBatchSampler)


def test_train_run_writes_metrics_and_a_checkpoint_of_the_trained_layers(make_cfg, tmp_path):
    train(make_cfg("method=skip_tuning", "method.module.start_layer=2", "protocol.shots=4"))
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "completed" and record["method"] == "skip_tuning"
    assert 0.0 <= record["metrics"]["test/imagenette/acc"] <= 100.0
    assert record["cost"]["train_steps"] == 10  # 4 shots x 10 classes in single-class batches of 4
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert set(state) == set(skip_tuning().trainable_parameter_names())


def test_loss_falls_on_a_fixed_batch():
    model = skip_tuning()  # CSkip on, sampled per batch: 3 true classes + a sample of the other 3
    images, labels = torch.randn(8, 3, 64, 64), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    tokens = model.frozen_image_tokens(images)
    optimizer = torch.optim.SGD(trainable(model), lr=0.02, momentum=0.9)

    def full_model_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model.logits(model.encode_images(images), model.encode_label_space(TRAIN)),
                                   labels).item()

    before = full_model_loss()
    for _ in range(20):
        optimizer.zero_grad()
        loss, _, _ = model.cached_loss(tokens, labels)
        loss.backward()
        optimizer.step()
    assert full_model_loss() < 0.5 * before  # trained from the cache, better through the full encoders


def test_vit_b16_trainable_parameter_count():
    model = SkipTuning(load_backbone("ViT-B-16", None), start_layer=6)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 62_099_456


@pytest.mark.parametrize(
    ("experiment", "data", "epochs", "lr", "warmup"),
    [
        ("skip_tuning_base2new", "dtd", 20, 2e-5, 1),
        ("skip_tuning_base2new", "food101", 5, 2e-5, 1),
        ("skip_tuning_few_shot", "sun397", 10, 1e-5, 0),
        ("skip_tuning_few_shot", "oxford_pets", 40, 1e-5, 0),
        ("skip_tuning_cross_dataset", None, 5, 1e-5, 1),
    ],
)
def test_recipes(make_cfg, experiment, data, epochs, lr, warmup):
    cfg = make_cfg(f"experiment={experiment}", *([f"data={data}"] if data else []), fast=False)
    assert cfg.method.name == "skip_tuning" and cfg.method.batch_size == 4
    assert cfg.method.max_epochs == epochs
    assert cfg.method.module.optimizer.lr == lr and cfg.method.module.scheduler.warmup == warmup
    assert cfg.method.module.batch_size == 4
    if data is None:
        assert cfg.data.name == "imagenet" and cfg.protocol.name == "cross_dataset"
