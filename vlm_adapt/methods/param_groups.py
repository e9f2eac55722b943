"""Optimizer parameter groups from config: per-part learning rates and weight-decay exclusions.

`param_groups` maps a group name to {prefixes: [...], lr: ..., (any optimizer option)}: a trainable
parameter whose name (as the LightningModule names it, e.g. `clip.visual.transformer...`) starts with
one of the prefixes joins the first group that matches; the rest form the default group with the
optimizer's own options. Skip Tuning's reference trains the image tower at its own rate this way.
`no_decay_names`: substrings of parameter names that get weight_decay 0 (CLIP4Clip / BERT's rule,
`["bias", "LayerNorm.bias", "LayerNorm.weight"]`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vlm_adapt.errors import ConfigError


def build_param_groups(
    named_parameters: list[tuple[str, nn.Parameter]],
    groups: dict[str, dict[str, Any]] | None = None,
    no_decay_names: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Parameter-group dicts for a torch optimizer; groups that end up empty are left out."""
    groups = groups or {}
    for name, spec in groups.items():
        if not spec.get("prefixes"):
            raise ConfigError(f"method.module.param_groups.{name} needs a non-empty 'prefixes' list")
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for param_name, param in named_parameters:
        group = next((g for g, spec in groups.items() if param_name.startswith(tuple(spec["prefixes"]))), "default")
        decay_off = any(part in param_name for part in (no_decay_names or []))
        buckets.setdefault((group, decay_off), []).append(param)
    result = []
    for (group, decay_off), params in buckets.items():
        options = {k: v for k, v in groups.get(group, {}).items() if k != "prefixes"}
        if decay_off:
            options["weight_decay"] = 0.0
        result.append({"params": params, "name": group + ("/no_decay" if decay_off else ""), **options})
    return result
