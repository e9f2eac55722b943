"""BitFit (Ben Zaken et al., ACL 2022) on CLIP: only the bias terms of both towers train.

As the reference (benzakenelad/BitFit glue_evaluator.py: `--bias-terms all` trains every parameter whose name
contains "bias"), every bias of the model trains, LayerNorm biases included: in each resblock of both towers the
attention's `in_proj_bias` (q, k, v) and `out_proj.bias`, the MLP's `c_fc.bias` and `c_proj.bias`, and the
biases of `ln_1` and `ln_2`; and `visual.ln_pre`, `visual.ln_post` and `ln_final`'s biases. No weight,
embedding or projection trains, nor `logit_scale` (CLIP's projections and `conv1` have no bias). The reference's
new BERT classification head, trained beside the biases, has no counterpart here: CLIP's classifier is the text
tower's class features, which the text biases move. At ViT-B/16 that is
12 x 11 x 768 + 2 x 768 (image) + 12 x 11 x 512 + 512 (text) = 171,008 parameters (138,240 without the
LayerNorm biases, `layer_norm: false`). The loss is plain cross-entropy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from torch import nn

from vlm_adapt.backbones import Backbone
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.registry import register_method

log = logging.getLogger(__name__)

ENCODERS = ("both", "text", "vision")


def bias_parameters(clip: nn.Module, encoder: str = "both", layer_norm: bool = True) -> Iterator[nn.Parameter]:
    """The bias terms of `clip` (open_clip names: every parameter whose own name contains "bias") in the
    chosen towers; `layer_norm=False` leaves the LayerNorms' biases out."""
    for module_name, module in clip.named_modules():
        vision = module_name == "visual" or module_name.startswith("visual.")
        if (encoder == "text" and vision) or (encoder == "vision" and not vision):
            continue
        if not layer_norm and isinstance(module, nn.LayerNorm):  # open_clip's LayerNorms subclass nn.LayerNorm
            continue
        for name, param in module.named_parameters(recurse=False):
            if "bias" in name:
                yield param


@register_method("bitfit")
class BitFit(CLIPMethod):

    def __init__(self, backbone: Backbone, encoder: str = "both", layer_norm: bool = True, **kwargs: Any):
        """`encoder`: the towers whose biases train (both, text, vision); `layer_norm`: the LayerNorms' biases
        too (the reference's `all`: every bias term)."""
        if encoder not in ENCODERS:
            raise ConfigError(f"method.module.encoder={encoder!r}: pick the towers whose biases train, one of "
                              f"{', '.join(ENCODERS)}")
        self.encoder, self.layer_norm = encoder, bool(layer_norm)  # read by select_trainable (CLIPMethod.__init__)
        super().__init__(backbone, **kwargs)
        log.info("BitFit trains %s bias parameters (%s, LayerNorm biases %s)",
                 f"{sum(p.numel() for p in self.parameters() if p.requires_grad):,}", encoder,
                 "included" if layer_norm else "frozen")

    def select_trainable(self) -> None:
        for param in bias_parameters(self.clip, self.encoder, self.layer_norm):
            param.requires_grad_(True)
