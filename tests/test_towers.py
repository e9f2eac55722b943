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


def test_image_embeddings_then_ln_pre_is_open_clips_embedding(tiny):
    visual = tiny.model.eval().visual
    towers = CLIPTowers(tiny.model)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(visual.ln_pre(towers.image_embeddings(images)), visual._embeds(images))


def test_extra_image_tokens_join_before_ln_pre_and_attend_with_the_patches(tiny):
    model = tiny.model.eval()
    towers = CLIPTowers(model)
    images, extra = torch.randn(2, 3, 64, 64), torch.randn(3, towers.image_width)
    with torch.no_grad():
        tokens = towers.image_tokens(images, extra)
        expected = model.visual.ln_pre(torch.cat([towers.image_embeddings(images), extra.expand(2, -1, -1)], 1))
        torch.testing.assert_close(tokens, expected)
        x = expected
        for block in model.visual.transformer.resblocks:
            x = block(x)
        torch.testing.assert_close(towers.encode_image(images, extra), towers.image_head(x))
        assert not torch.allclose(towers.encode_image(images, extra), model.encode_image(images))


def test_block_edits_change_only_the_chosen_blocks_inputs(tiny):
    model = tiny.model.eval()
    towers = CLIPTowers(model)
    tokens = tiny.tokenizer(PROMPTS)
    eot = towers.eot_index(tokens)
    words = towers.token_embeddings(tokens)
    deep = torch.randn(2, towers.text_width)

    def replace(x):
        return torch.cat([x[:, :1], deep.expand(len(x), -1, -1), x[:, 3:]], dim=1)

    with torch.no_grad():
        edited = towers.encode_text_embeddings(words, eot, edits={1: replace})
        x = towers.text_embeddings(words, towers.text_length(eot))
        mask = model.attn_mask[: x.shape[1], : x.shape[1]]
        for i, block in enumerate(model.transformer.resblocks):
            x = block(replace(x) if i == 1 else x, attn_mask=mask)
        torch.testing.assert_close(edited, towers.text_head(x, eot))
        # no edits: open_clip's own result
        torch.testing.assert_close(towers.encode_text_embeddings(words, eot, edits={}), model.encode_text(tokens),
                                   rtol=1e-4, atol=1e-5)


def test_an_edit_outside_the_tower_is_refused(tiny):
    from vlm_adapt.errors import ConfigError

    towers = CLIPTowers(tiny.model)
    with pytest.raises(ConfigError, match="no block 99"):
        towers.image_layers(torch.randn(1, 5, towers.image_width), edits={99: lambda x: x})
