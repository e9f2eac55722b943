"""UniPT: only the parallel networks train, the frozen backbone keeps no activation for backward,
the hidden-state cache is exact and spares the backbone after the first epoch."""

from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

import vlm_adapt.config  # noqa: F401  (registers the resolvers the composed config uses)
from vlm_adapt.backbones import load_backbone
from vlm_adapt.build import build_backbone, build_datamodule, build_method, build_trainer
from vlm_adapt.data.feature_cache import FeatureCache, TowerStates
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.ft import FullFineTuning
from vlm_adapt.methods.unipt import ParallelNetwork, UniPT
from vlm_adapt.metrics.retrieval import contrastive_loss

ADAMW = {"_target_": "torch.optim.AdamW", "lr": 1e-3}
CAPTIONS = [
    "a dog.",
    "a kitchen with a stove, a sink and a cat sleeping on the counter next to a window.",
    "two birds on a wire.",
    "a man riding a red bicycle down a busy city street.",
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_backbone("vlm-tiny", None)


def make_unipt(backbone, **kwargs) -> UniPT:
    torch.manual_seed(0)
    return UniPT(backbone, optimizer=ADAMW, **kwargs)


def retrieval_loss(model, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    image_features = model.encode_images(images)
    text_features = F.normalize(model.encode_prompts(captions), dim=-1)
    return contrastive_loss(model.logits(image_features, text_features), torch.arange(len(images)))


def test_parameter_count_at_vit_b16():
    """ViT-B/16: 13 hidden states per tower, widths 768 (vision) and 512 (text), embed_dim 512."""

    def count(factor: int, width_from: str = "tower") -> int:
        towers = (ParallelNetwork(13, 768, 512, factor, width_from), ParallelNetwork(13, 512, 512, factor, width_from))
        return sum(p.numel() for network in towers for p in network.parameters())

    assert count(2) == 6_203_778
    assert count(1) == 12_406_530
    # the reference's rule d = embed_dim / factor: vision d = 512, not 768, at factor 1
    # vision 13 x (768 x 512 + 512) + 2 x (512 x 512 + 512) + 513, text as above
    assert count(1, "embed_dim") == 5_644_289 + 3_940_353


def test_only_the_parallel_networks_train(tiny):
    model = make_unipt(tiny)
    names = model.trainable_parameter_names()
    assert names and all(name.startswith(("image_parallel.", "text_parallel.")) for name in names)
    assert not any(p.requires_grad for p in model.clip.parameters())
    # 5 hidden states per tower (embedding + 4 resblocks), width 64, d = 32, embed_dim 64
    per_tower = 5 * (64 * 32 + 32) + (64 * 32 + 32) + (32 + 1) + (32 * 64 + 64)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * per_tower


def test_no_gradient_reaches_the_backbone(tiny):
    model = make_unipt(tiny)
    retrieval_loss(model, torch.randn(4, 3, 64, 64), CAPTIONS).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.clip.parameters())
    trained = [p for n, p in model.named_parameters() if n.startswith(("image_parallel.", "text_parallel."))]
    assert all(p.grad is not None for p in trained)


def saved_tensors_inside_backbone(model, compute_loss) -> int:
    """How many tensors autograd saves for backward while a transformer block of either tower runs."""
    depth, saved = [0], [0]
    blocks = [*model.clip.visual.transformer.resblocks, *model.clip.transformer.resblocks]
    handles = [b.register_forward_pre_hook(lambda *_: depth.__setitem__(0, depth[0] + 1)) for b in blocks]
    handles += [b.register_forward_hook(lambda *_: depth.__setitem__(0, depth[0] - 1)) for b in blocks]

    def pack(tensor):
        saved[0] += depth[0] > 0
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            compute_loss()
    finally:
        for handle in handles:
            handle.remove()
    return saved[0]


def test_backbone_activations_are_not_kept_for_backward(tiny):
    images = torch.randn(4, 3, 64, 64)
    model = make_unipt(tiny)
    states = model.image_states(images)
    assert all(layer.grad_fn is None and not layer.requires_grad for layer in states.layers)
    assert states.pooled.grad_fn is None
    assert saved_tensors_inside_backbone(model, lambda: retrieval_loss(model, images, CAPTIONS)) == 0
    # the same probe sees the activations full fine-tuning keeps
    finetuned = FullFineTuning(load_backbone("vlm-tiny", None), optimizer=ADAMW)
    assert saved_tensors_inside_backbone(finetuned, lambda: retrieval_loss(finetuned, images, CAPTIONS)) > 0


def test_loss_falls_on_a_fixed_batch(tiny):
    model = make_unipt(tiny)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        loss = retrieval_loss(model, images, CAPTIONS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


def reference_parallel_network(network: ParallelNetwork, states: TowerStates) -> torch.Tensor:
    """The five steps for one sample at a time, on its real tokens only (no padding, no mask)."""
    outputs = []
    for n in range(len(states.pooled)):
        length, pool = int(states.lengths[n]), int(states.pool_index[n])
        anchor = network.anchor_down(states.pooled[n])
        summaries, scores = [], []
        for down, layer in zip(network.token_down, states.layers):
            tokens = down(layer[n, :length])
            weights = torch.relu(tokens @ anchor)
            weights = weights / weights.sum().clamp(min=1e-6)
            summaries.append(weights @ tokens + tokens[pool])
            scores.append(network.confidence(anchor * tokens.mean(dim=0)))
        confidence = torch.softmax(torch.cat(scores), dim=0)
        merged = sum(c * s for c, s in zip(confidence, summaries))
        outputs.append(states.pooled[n] + network.up(merged))
    return torch.stack(outputs)


def test_parallel_network_matches_a_per_sample_reference_and_ignores_padding(tiny):
    model = make_unipt(tiny)
    tokens = model.tokenizer(CAPTIONS)
    with torch.no_grad():
        states = model.text_states(tokens)  # padded to the longest caption
        assert int(states.lengths.min()) < states.layers[0].shape[1]
        batched = model.text_parallel(states)
        torch.testing.assert_close(batched, reference_parallel_network(model.text_parallel, states))
        alone = model.text_parallel(model.text_states(tokens[:1]))  # the short caption without padding
        torch.testing.assert_close(batched[:1], alone, rtol=1e-5, atol=1e-5)


def test_cached_features_equal_the_backbone_path(tiny):
    model = make_unipt(tiny)
    images = torch.randn(4, 3, 64, 64)
    model.image_cache = FeatureCache("image", 4)
    model.caption_cache = FeatureCache("caption", 4)
    with torch.no_grad():
        direct_images, direct_text = model.encode_images(images), model.encode_prompts(CAPTIONS)
        index = torch.arange(4)
        torch.testing.assert_close(model.encode_images(images, index), direct_images)  # fills the cache
        torch.testing.assert_close(model.encode_prompts(CAPTIONS, index), direct_text)
        # read back in another batch composition (different padding), duplicates included
        order = torch.tensor([2, 0, 0])
        torch.testing.assert_close(model.encode_images(images[order], order), direct_images[order])
        captions = [CAPTIONS[i] for i in order]
        torch.testing.assert_close(model.encode_prompts(captions, order), direct_text[order], rtol=1e-5, atol=1e-5)
    assert len(model.image_cache) == 4 and len(model.caption_cache) == 4


def count_training_backbone_calls(model) -> dict[str, dict[int, int]]:
    """Samples the frozen towers encode during training steps, per epoch."""
    counts: dict[str, dict[int, int]] = {"image": defaultdict(int), "text": defaultdict(int)}
    for tower, name in (("image", "image_hidden_states"), ("text", "text_hidden_states")):
        original = getattr(model.towers, name)

        def counting(inputs, _tower=tower, _original=original):
            if model.training:
                counts[_tower][model.trainer.current_epoch] += len(inputs)
            return _original(inputs)

        setattr(model.towers, name, counting)
    return counts


def fit_counting(cfg) -> dict[str, dict[int, int]]:
    datamodule = build_datamodule(cfg)
    backbone = build_backbone(cfg)
    datamodule.set_preprocessing(backbone.model.visual.preprocess_cfg)
    model = build_method(cfg.method.module, backbone)
    if hasattr(datamodule, "train_items"):
        model.attach_label_spaces(datamodule.train_label_space, datamodule.test_label_spaces)
    counts = count_training_backbone_calls(model)
    build_trainer(cfg, [], []).fit(model, datamodule=datamodule)
    return counts


def test_retrieval_cache_spares_the_backbone_after_the_first_epoch(make_cfg):
    cfg = make_cfg("method=unipt", "data=coco_captions", "protocol=retrieval", "method.max_epochs=2",
                   "method.batch_size=128")
    counts = fit_counting(cfg)
    assert dict(counts["image"]) == {0: 80}  # each of the 80 images once, though it has 5 captions
    assert dict(counts["text"]) == {0: 400}


@pytest.mark.parametrize(("augment", "second_epoch_images"), [("none", 0), ("coop", 20)])
def test_classification_cache_only_without_augmentation(make_cfg, augment, second_epoch_images):
    cfg = make_cfg("method=unipt", "method.max_epochs=2", f"method.augment={augment}")
    counts = fit_counting(cfg)
    assert counts["image"][0] == 20  # 2 shots x 10 classes
    assert counts["image"][1] == second_epoch_images
    assert dict(counts["text"]) == {0: 10}  # the class prompts, once


def test_a_cache_that_would_not_fit_fails_at_the_first_batch_with_the_fix():
    cache = FeatureCache("image", num_samples=1_000_000, max_gb=0.001)
    states = TowerStates([torch.zeros(2, 50, 64)] * 5, torch.tensor([50, 50]), torch.zeros(2, dtype=torch.long),
                         torch.zeros(2, 64))
    with pytest.raises(ConfigError, match="cache=none"):
        cache.put([0, 1], states)


def test_bad_cache_setting_is_refused(tiny):
    with pytest.raises(ConfigError, match="method.module.cache"):
        UniPT(tiny, cache="disk")
