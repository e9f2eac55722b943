"""VPT (Jia et al., ECCV 2022) on CLIP's image tower: learned tokens in the vision transformer, text frozen.

Shallow: M tokens appended after the patch tokens before ln_pre. Deep: also, before each vision block
j = 1 .. J-1, the last M tokens are replaced by block j's own learned tokens (J = prompt depth, 12 =
every block). Only the tokens train: M x 768 (8 x 768 = 6,144 shallow) and J x M x 768 (12 x 8 x 768 =
73,728 deep) at ViT-B/16. The class text features are CLIP's zero-shot ones for the label space's
templates (the reference prompts every dataset with "a photo of a {}.": `prompt_templates=photo`),
computed once.

As the reference (muzairkhattak/multimodal-prompt-learning trainers/vpt.py and clip/model.py, the VPT
baseline of MaPLe and PromptSRC): every token N(0, 0.02), the prompts join after the positional embedding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vlm_adapt.backbones import Backbone
from vlm_adapt.backbones.towers import BlockEdits
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.deep_prompts import check_prompts, image_prompt_edits, new_prompts
from vlm_adapt.methods.registry import register_method


class VisualPrompts(CLIPMethod):
    """Vision prompts of `n_ctx_vision` tokens in the first `prompt_depth_vision` blocks of the image tower."""

    def __init__(self, backbone: Backbone, n_ctx_vision: int = 8, prompt_depth_vision: int = 12, **kwargs: Any):
        super().__init__(backbone, **kwargs)
        check_prompts(n_ctx_vision, prompt_depth_vision, self.towers.num_image_layers,
                      "n_ctx_vision", "prompt_depth_vision")
        self.n_ctx_vision = n_ctx_vision
        self.prompt_depth_vision = prompt_depth_vision
        width = self.towers.image_width
        self.visual_ctx = nn.Parameter(torch.randn(n_ctx_vision, width) * 0.02)
        self.visual_prompts = new_prompts(prompt_depth_vision - 1, n_ctx_vision, width)

    def image_features_need_grad(self) -> bool:
        return self.visual_ctx.requires_grad

    def text_features_need_grad(self) -> bool:
        return False

    def image_edits(self) -> BlockEdits:
        """Before vision block j (1 .. J-1): the last M tokens are block j's prompts."""
        return image_prompt_edits(list(self.visual_prompts))

    def encode_images(self, images: Tensor, index: Tensor | None = None) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.image_features_need_grad()):
            return self.towers.encode_image(images, extra=self.visual_ctx, edits=self.image_edits())


@register_method("vpt_shallow")
class VPTShallow(VisualPrompts):
    """Input tokens only (the prompt depth is 1)."""

    def __init__(self, backbone: Backbone, n_ctx_vision: int = 8, prompt_depth_vision: int = 1, **kwargs: Any):
        """`n_ctx_vision`: the prompt tokens (M). The depth is 1 (a saved run's hyper-parameters repeat it)."""
        if prompt_depth_vision != 1:
            raise ConfigError(f"method=vpt_shallow prompts the input only (prompt_depth_vision=1), got "
                              f"{prompt_depth_vision!r}; use method=vpt_deep for prompts in deeper blocks.")
        super().__init__(backbone, n_ctx_vision=n_ctx_vision, prompt_depth_vision=1, **kwargs)


@register_method("vpt_deep")
class VPTDeep(VisualPrompts):
    """New tokens before each of the first `prompt_depth_vision` blocks (12: all of ViT-B/16's)."""

    def __init__(self, backbone: Backbone, n_ctx_vision: int = 8, prompt_depth_vision: int = 12, **kwargs: Any):
        """`n_ctx_vision`: tokens per block (M); `prompt_depth_vision`: the blocks with prompts (J, input
        included; 1 is VPT-shallow)."""
        super().__init__(backbone, n_ctx_vision=n_ctx_vision, prompt_depth_vision=prompt_depth_vision, **kwargs)
