"""Load an open_clip CLIP by name with weights from a tag, a file or a `local-dir:` folder.

Importing this module registers vlm_adapt's own model configs (the `vlm-tiny` test model) with
open_clip, so spawned workers and Slurm jobs that import vlm_adapt see them too.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from vlm_adapt.errors import ConfigError, WeightsNotFoundError

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

LOCAL_DIR_PREFIX = "local-dir:"
RANDOM_INIT_BANNER = (
    "RANDOM-INIT BACKBONE: {model} has no pretrained weights (pretrained: null). "
    "Accuracies from this run measure the plumbing, not CLIP."
)


@dataclass
class Backbone:
    """A loaded CLIP with what the rest of the framework needs to use it."""

    model: nn.Module
    tokenizer: Any
    train_transform: Any
    eval_transform: Any
    model_name: str
    pretrained: str | None
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def random_init(self) -> bool:
        return self.pretrained is None


def _weights_help(model_name: str) -> str:
    tags = open_clip.list_pretrained_tags_by_model(model_name) if not model_name.startswith("local") else []
    tag_text = ", ".join(tags) if tags else "(none registered for this model)"
    return (
        f"Set backbone.pretrained to one of: an open_clip tag for {model_name} [{tag_text}] "
        "(needs the weights in the Hugging Face cache or a network), a path to a local weights file "
        "(.pt/.bin/.safetensors), a 'local-dir:/path' folder holding open_clip_config.json and weights, "
        "or null for random weights (the run is then tagged random-init)."
    )


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors")) or value.startswith(".")


QUICK_GELU_CHOICES = ("auto", True, False)


def resolve_quick_gelu(model_name: str, tag: str | None, quick_gelu: str | bool = "auto") -> tuple[bool, bool]:
    """(QuickGELU on?, changed from the model config?) for `model_name` loaded with weights `tag`.

    OpenAI's weights (and others, per open_clip's pretrained registry) were trained with QuickGELU;
    open_clip's plain configs (ViT-B-16) use GELU and only warn when the two disagree, which silently
    costs accuracy. `auto` follows the tag's registry entry (the model config's own value for weights
    files, local-dir folders and random weights); an explicit True/False that contradicts the tag is
    an error, since those weights would then run under an activation they were not trained with.
    """
    if quick_gelu not in QUICK_GELU_CHOICES:
        raise ConfigError(f"backbone.quick_gelu must be auto, true or false, got {quick_gelu!r}")
    model_value = bool((open_clip.get_model_config(model_name) or {}).get("quick_gelu", False))
    tag_value = None
    if tag is not None and tag in open_clip.list_pretrained_tags_by_model(model_name):
        tag_value = bool(open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu", False))
    if quick_gelu == "auto":
        wanted = model_value if tag_value is None else tag_value
    else:
        wanted = bool(quick_gelu)
        if tag_value is not None and wanted != tag_value:
            raise ConfigError(
                f"backbone.quick_gelu={str(wanted).lower()} contradicts the weights: open_clip's {model_name!r} "
                f"tag {tag!r} was trained with {'QuickGELU' if tag_value else 'GELU'}. Use "
                "backbone.quick_gelu=auto (the activation the weights were trained with)."
            )
    return wanted, wanted != model_value


def load_backbone(
    model_name: str,
    pretrained: str | None,
    precision: str = "fp32",
    cache_dir: str | None = None,
    quick_gelu: str | bool = "auto",
    init_seed: int | None = None,
    **_: Any,
) -> Backbone:
    """Create the open_clip model, its train/eval transforms and tokenizer.

    `pretrained` is an open_clip tag ("openai"), a weights file, a "local-dir:/folder", or None
    for random weights (explicitly only: a missing file is an error, never a silent fallback).
    `quick_gelu`: the activation, `auto` = the one the tag's weights were trained with
    (`resolve_quick_gelu`); the identity records it, so checkpoints refuse the other activation.
    `init_seed`: the seed of the random initialisation, drawn from a private RNG stream (the global
    one is left as it was; None: open_clip draws from the global one). With random weights it is part
    of the identity, so a checkpoint, which holds only the trained tensors, is evaluated on the very
    backbone it was trained on.
    """
    name, weights = model_name, pretrained
    if pretrained is not None and pretrained.startswith(LOCAL_DIR_PREFIX):
        folder = Path(pretrained[len(LOCAL_DIR_PREFIX):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise WeightsNotFoundError(
                f"backbone.pretrained={pretrained!r}: no open_clip_config.json in {folder}. "
                + _weights_help(model_name)
            )
        name, weights = f"{LOCAL_DIR_PREFIX}{folder}", None
    elif name not in open_clip.list_models():
        raise ConfigError(
            f"Unknown open_clip model {model_name!r}. Pick one of open_clip.list_models(), e.g. "
            "ViT-B-16, ViT-B-32, or vlm-tiny for tests."
        )
    elif pretrained is not None and _looks_like_path(pretrained):
        if not Path(pretrained).expanduser().is_file():
            raise WeightsNotFoundError(
                f"backbone.pretrained={pretrained!r}: no such weights file. " + _weights_help(model_name)
            )
        weights = str(Path(pretrained).expanduser())
    elif pretrained is not None and pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
        raise WeightsNotFoundError(
            f"backbone.pretrained={pretrained!r} is neither a file nor a known tag. " + _weights_help(model_name)
        )

    activation: dict[str, Any] = {}
    if not name.startswith(LOCAL_DIR_PREFIX):
        use_quick_gelu, changed = resolve_quick_gelu(model_name, pretrained, quick_gelu)
        if changed:
            log.warning(
                "%s with weights %r: using QuickGELU=%s (the activation these weights were trained with; "
                "open_clip's %s config says otherwise). Recorded in the run's backbone identity.",
                model_name, pretrained, use_quick_gelu, model_name,
            )
        # open_clip's force_quick_gelu turns it on; a model keyword (highest priority) turns it off
        activation = {"force_quick_gelu": True} if use_quick_gelu else {"quick_gelu": False}
    try:
        with torch.random.fork_rng(devices=[], enabled=init_seed is not None):
            if init_seed is not None:
                torch.manual_seed(init_seed)
            model, train_transform, eval_transform = open_clip.create_model_and_transforms(
                name, pretrained=weights, precision=precision, cache_dir=cache_dir, **activation
            )
    except Exception as err:  # open_clip raises many kinds here: network, hub, file format
        if pretrained is None:
            raise
        raise WeightsNotFoundError(
            f"Could not load weights {pretrained!r} for {model_name}: {type(err).__name__}: {err}. "
            "Without a network, only weights already on disk can be used. " + _weights_help(model_name)
        ) from err

    if not hasattr(model, "token_embedding") or not hasattr(model.visual, "transformer"):
        raise ConfigError(
            f"{model_name} is not a ViT CLIP with open_clip's own text tower; vlm_adapt's methods need "
            "visual.transformer and token_embedding (ViT-B-16, ViT-B-32, ViT-L-14, ...)."
        )
    if pretrained is None:
        log.warning(RANDOM_INIT_BANNER.format(model=model_name))
    tokenizer = open_clip.get_tokenizer(name)
    identity = {"model_name": model_name, "pretrained": pretrained, "quick_gelu": _uses_quick_gelu(model)}
    if pretrained is None:  # no weights to reload: the seed rebuilds the same random backbone
        identity["init_seed"] = init_seed
    return Backbone(model, tokenizer, train_transform, eval_transform, model_name, pretrained, identity)


def _uses_quick_gelu(model: nn.Module) -> bool:
    """Whether the built model's MLPs use QuickGELU (read off the modules, not the config)."""
    return any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.modules())


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

