"""QuickGELU: weights run under the activation they were trained with, for every open_clip tag."""

import open_clip
import pytest

from vlm_adapt.backbones import load_backbone
from vlm_adapt.backbones.loading import resolve_quick_gelu
from vlm_adapt.errors import ConfigError


@pytest.mark.parametrize(
    "model_name, tag, expected",
    [
        ("ViT-B-16", "openai", (True, True)),            # GELU config, QuickGELU weights: fixed
        ("ViT-B-32", "openai", (True, True)),
        ("ViT-B-16-quickgelu", "openai", (True, False)),
        ("ViT-B-16", "laion2b_s34b_b88k", (False, False)),
        ("ViT-B-16", None, (False, False)),              # random weights: the config's own activation
        ("vlm-tiny", None, (True, False)),
    ],
)
def test_auto_follows_the_tags_registry_entry(model_name, tag, expected):
    assert resolve_quick_gelu(model_name, tag, "auto") == expected


def test_every_registered_tag_resolves_to_its_own_activation():
    checked = 0
    for model_name, tag in open_clip.list_pretrained():
        config = open_clip.get_model_config(model_name)
        if not config or "timm_model_name" in config.get("vision_cfg", {}):
            continue  # timm towers ignore the flag
        wanted, _ = resolve_quick_gelu(model_name, tag, "auto")
        assert wanted == bool(open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu", False))
        checked += 1
    assert checked > 50


def test_contradicting_a_tag_is_an_error_naming_the_fix():
    with pytest.raises(ConfigError, match="trained with QuickGELU.*backbone.quick_gelu=auto"):
        resolve_quick_gelu("ViT-B-16", "openai", False)
    with pytest.raises(ConfigError, match="auto, true or false"):
        resolve_quick_gelu("ViT-B-16", "openai", "yes")


def test_openai_tag_builds_quickgelu_modules(monkeypatch):
    """The real ViT-B/16 architecture with the openai tag's config, random weights (no download here)."""
    real = open_clip.create_model_and_transforms
    seen = {}

    def without_download(name, pretrained=None, **kwargs):
        seen.update(kwargs, pretrained=pretrained)
        return real(name, pretrained=None, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", without_download)
    backbone = load_backbone("ViT-B-16", "openai")
    assert seen["pretrained"] == "openai" and seen["force_quick_gelu"] is True
    acts = {type(block.mlp.gelu).__name__ for block in backbone.model.visual.transformer.resblocks}
    acts |= {type(block.mlp.gelu).__name__ for block in backbone.model.transformer.resblocks}
    assert acts == {"QuickGELU"}
    assert backbone.identity == {"model_name": "ViT-B-16", "pretrained": "openai", "quick_gelu": True}


def test_random_weights_keep_the_config_activation():
    backbone = load_backbone("vlm-tiny", None)
    assert backbone.identity["quick_gelu"] is True
    gelu = load_backbone("vlm-tiny", None, quick_gelu=False)
    assert type(gelu.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"
    assert gelu.identity["quick_gelu"] is False
