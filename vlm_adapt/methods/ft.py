"""Full fine-tuning: every parameter of both towers trains (embeddings included); logit_scale stays frozen.

`frozen`: names (prefixes, relative to the CLIP model) that stay frozen anyway. The Skip Tuning paper's
FT baseline (`experiment=ft_skip_tuning_base2new`) freezes the token, positional and class embeddings,
`conv1` and `ln_pre`, as its reference code does.
"""

from __future__ import annotations

from typing import Any

from vlm_adapt.backbones import Backbone
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.registry import CLASSIFICATION, RETRIEVAL, register_method


@register_method("ft", tasks=(CLASSIFICATION, RETRIEVAL))
class FullFineTuning(CLIPMethod):

    def __init__(self, backbone: Backbone, frozen: list[str] | None = None, **kwargs: Any):
        self.frozen = tuple(frozen or ())  # read by select_trainable, which CLIPMethod.__init__ calls
        super().__init__(backbone, **kwargs)

    def select_trainable(self) -> None:
        self.clip.requires_grad_(True)
        self.clip.logit_scale.requires_grad_(False)
        names = [name for name, _ in self.clip.named_parameters()]
        unknown = [prefix for prefix in self.frozen if not any(n.startswith(prefix) for n in names)]
        if unknown:
            raise ConfigError(
                f"method.module.frozen: {unknown} name no parameter of the CLIP model "
                "(names such as token_embedding, visual.conv1, visual.ln_pre)."
            )
        for name, param in self.clip.named_parameters():
            if name.startswith(self.frozen):
                param.requires_grad_(False)
