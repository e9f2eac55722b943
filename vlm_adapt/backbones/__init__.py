"""open_clip backbones: loading (tags, files, local dirs), the tiny test config, split encoders."""

from vlm_adapt.backbones.loading import Backbone, load_backbone
from vlm_adapt.backbones.towers import CLIPTowers

__all__ = ["Backbone", "CLIPTowers", "load_backbone"]
