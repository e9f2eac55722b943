"""Backbone loading: random weights only when asked, a clear error naming the options otherwise."""

import logging

import pytest

from vlm_adapt.backbones import load_backbone
from vlm_adapt.errors import ConfigError, WeightsNotFoundError


def test_random_init_is_explicit_and_warned(caplog):
    with caplog.at_level(logging.WARNING):
        backbone = load_backbone("vlm-tiny", None)
    assert backbone.random_init
    assert "RANDOM-INIT" in caplog.text


def test_missing_weights_file_names_the_options(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no such weights file.*open_clip tag.*local-dir"):
        load_backbone("ViT-B-16", str(tmp_path / "missing.pt"))


def test_unknown_tag_lists_known_tags():
    with pytest.raises(WeightsNotFoundError, match="openai"):
        load_backbone("ViT-B-16", "not-a-tag")


def test_tag_without_network_or_cache_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="Without a network"):
        load_backbone("ViT-B-32", "openai")


def test_local_dir_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="open_clip_config.json"):
        load_backbone("ViT-B-16", f"local-dir:{tmp_path}")


def test_local_weights_file_loads(tmp_path):
    import torch

    source = load_backbone("vlm-tiny", None)
    path = tmp_path / "tiny.pt"
    torch.save(source.model.state_dict(), path)
    loaded = load_backbone("vlm-tiny", str(path))
    assert not loaded.random_init
    torch.testing.assert_close(loaded.model.visual.proj, source.model.visual.proj)


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="Unknown open_clip model"):
        load_backbone("ViT-Q-99", None)
