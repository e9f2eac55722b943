"""The split towers reproduce open_clip exactly, and the text tower runs only up to the longest prompt."""

import pytest
import torch

from vlm_adapt.backbones import CLIPTowers, load_backbone

PROMPTS = ["a photo of a tench.", "itap of a very large and unusually long-named garbage truck.", "x"]


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("vlm-tiny", None)


@pytest.mark.parametrize("model_name", ["vlm-tiny", "ViT-B-16"])
def test_truncated_text_encoding_matches_open_clip(model_name):
    backbone = load_backbone(model_name, None)
    model = backbone.model.eval()
    towers = CLIPTowers(model)
    tokens = backbone.tokenizer(PROMPTS)
    with torch.no_grad():
        reference = model.encode_text(tokens)
        truncated = towers.encode_text(tokens)
        chunked = towers.encode_in_chunks(lambda t, _: towers.encode_text(t), tokens, towers.eot_index(tokens), 2)
    assert int(towers.eot_index(tokens).max()) + 1 < 77  # it really ran fewer positions
    torch.testing.assert_close(truncated, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked, reference, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the untruncated path (for cost comparisons) is open_clip's computation
        torch.testing.assert_close(CLIPTowers(model, truncate_text=False).encode_text(tokens), reference)


def test_split_image_tower_matches_open_clip(tiny):
    model = tiny.model.eval()
    towers = CLIPTowers(model)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        staged = towers.image_head(towers.image_layers(towers.image_layers(towers.image_tokens(images), 0, 2), 2))
        torch.testing.assert_close(staged, model.encode_image(images))


def test_hidden_states_cover_every_layer(tiny):
    towers = CLIPTowers(tiny.model.eval())
    with torch.no_grad():
        image_states = towers.image_hidden_states(torch.randn(2, 3, 64, 64))
        text_states = towers.text_hidden_states(tiny.tokenizer(PROMPTS))
    assert len(image_states.layers) == towers.num_image_layers + 1
    assert len(text_states.layers) == towers.num_text_layers + 1
    reference = tiny.model.encode_text(tiny.tokenizer(PROMPTS))
    torch.testing.assert_close(text_states.pooled, reference, rtol=1e-4, atol=1e-5)
