"""LoRA on the attention projections of open_clip's resblocks, as CLIP-LoRA places it.

`inject_lora(clip, encoder=..., position=..., params=..., r=..., alpha=..., dropout=...)` replaces the
`attn` (an `nn.MultiheadAttention`) of chosen resblocks of the chosen towers by `LoRAMultiheadAttention`,
which keeps the original module, frozen and unchanged, as its `base` and adds a low-rank update to
chosen projections among q, k, v (the three parts of the packed `in_proj_weight`) and o (`out_proj`):

    p(x) = W_p x + b_p + (alpha / sqrt(r)) B_p A_p dropout_p(x),

A_p (r x width) initialised as `nn.Linear` weights (Kaiming-uniform, a = sqrt(5)), B_p (width x r) at
zero, so an injected model starts as the original; each projection draws its own dropout mask, in
training only (MaxZanella/CLIP-LoRA loralib/layers.py `LinearLoRA`; its `LoRALayer` scales by
alpha / sqrt(r), with alpha / r commented out). open_clip's own block forward still runs: it calls
`attn(q_x, k_x, v_x, need_weights=False, attn_mask=...)`, which this module answers with the same
operations `nn.MultiheadAttention` runs (packed in-projection, scaled dot-product attention, out-
projection), so with every B at zero the towers' outputs equal the original model's bit for bit where
both run torch's reference path (autograd on), and to rounding against the fused inference kernel that
`nn.MultiheadAttention` picks under no_grad in eval mode (or where attention picks another kernel).

Layer positions are the reference's (`loralib/utils.py` INDEX_POSITIONS_*), written as fractions of a
tower's depth so that they hold for any depth: at 12 layers `bottom` = 0-3, `mid` = 4-7, `up` = 8-11,
`half-bottom` = 0-5, `half-up` = 6-11, `top3` = 9-11, `all` = 0-11.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_adapt.errors import ConfigError

PROJECTIONS = ("q", "k", "v", "o")
ENCODERS = ("text", "vision", "both")
POSITIONS = ("all", "bottom", "mid", "up", "half-up", "half-bottom", "top3")


def position_indices(position: str, num_layers: int) -> list[int]:
    """The resblock indices `position` names in a tower of `num_layers` blocks (see the module doc)."""
    L = num_layers
    spans = {
        "all": (0, L), "bottom": (0, L // 3), "mid": (L // 3, 2 * L // 3), "up": (2 * L // 3, L),
        "half-bottom": (0, L // 2), "half-up": (L // 2, L), "top3": (max(0, L - 3), L),
    }
    if position not in spans:
        raise ConfigError(f"LoRA position {position!r} is not one of {', '.join(POSITIONS)}")
    return list(range(*spans[position]))


def check_lora_options(encoder: str, position: str, params: Sequence[str], r: int, alpha: float,
                       dropout: float, prefix: str = "method.module.") -> None:
    """Every problem with the options is a ConfigError naming the option and what it may be."""
    if encoder not in ENCODERS:
        raise ConfigError(f"{prefix}encoder={encoder!r}: pick one of {', '.join(ENCODERS)}")
    if position not in POSITIONS:
        raise ConfigError(f"{prefix}position={position!r}: pick one of {', '.join(POSITIONS)}")
    listed = not isinstance(params, str) and isinstance(params, Sequence)
    if not listed or not params or any(p not in PROJECTIONS for p in params) or len(set(params)) != len(params):
        shown = list(params) if listed else params
        raise ConfigError(f"{prefix}params={shown!r}: a non-empty list without repeats from {', '.join(PROJECTIONS)}")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"{prefix}r={r!r}: the LoRA rank must be an integer >= 1")
    if not alpha > 0:
        raise ConfigError(f"{prefix}alpha={alpha!r}: the LoRA scale alpha must be > 0")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{prefix}dropout={dropout!r}: the dropout rate on the LoRA input must be in [0, 1)")


class LoRAMultiheadAttention(nn.Module):
    """An `nn.MultiheadAttention` (kept as `base`, frozen) with LoRA on chosen projections of q, k, v, o.

    Trainable parameters: `lora_A[p]` (r x width) and `lora_B[p]` (width x r) for each projection p.
    Self- and cross-attention, 2-D and 3-D (float or boolean) attention masks; no key padding mask
    and no attention weights (open_clip asks for neither)."""

    def __init__(self, base: nn.MultiheadAttention, params: Sequence[str] = ("q", "k", "v"), r: int = 2,
                 alpha: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if not base._qkv_same_embed_dim or base.bias_k is not None or base.add_zero_attn:
            raise ConfigError("LoRA needs an nn.MultiheadAttention with a packed in_proj_weight and no bias_k / "
                              "bias_v / add_zero_attn (open_clip's resblocks)")
        self.base = base
        self.params = tuple(params)
        self.r = int(r)
        self.alpha = float(alpha)
        self.scaling = self.alpha / math.sqrt(self.r)
        width = base.embed_dim
        weight = base.in_proj_weight
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for p in self.params:
            A = nn.Parameter(weight.new_empty(self.r, width))
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            self.lora_A[p] = A
            self.lora_B[p] = nn.Parameter(weight.new_zeros(width, self.r))
        self.lora_dropout = nn.Dropout(dropout)  # called once per projection: independent masks

    def extra_repr(self) -> str:
        return f"params={list(self.params)}, r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:.4f}"

    def lora_delta(self, p: str, x: Tensor) -> Tensor:
        """(alpha / sqrt(r)) B_p A_p dropout(x), computed as two thin products."""
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A[p]), self.lora_B[p]) * self.scaling

    def _project(self, x: Tensor, weight: Tensor, bias: Tensor | None, p: str) -> Tensor:
        out = F.linear(x, weight, bias)
        return out + self.lora_delta(p, x) if p in self.lora_A else out

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, None]:
        base = self.base
        if need_weights or key_padding_mask is not None:
            raise NotImplementedError("LoRAMultiheadAttention returns no attention weights and takes no "
                                      "key_padding_mask; call it with need_weights=False (as open_clip does)")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not base.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        width, heads = base.embed_dim, base.num_heads
        weight, bias = base.in_proj_weight, base.in_proj_bias
        if query is key and key is value:  # self-attention: one packed in-projection, as torch runs it
            packed = F.linear(query, weight, bias).chunk(3, dim=-1)
            q, k, v = (x + self.lora_delta(p, query) if p in self.lora_A else x for x, p in zip(packed, "qkv"))
        else:
            weights = weight.chunk(3)
            biases = bias.chunk(3) if bias is not None else (None, None, None)
            q, k, v = (self._project(x, w, b, p) for x, w, b, p in zip((query, key, value), weights, biases, "qkv"))
        n, t, s = query.shape[0], query.shape[1], key.shape[1]
        q, k, v = (x.reshape(n, length, heads, width // heads).transpose(1, 2)
                   for x, length in ((q, t), (k, s), (v, s)))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                # nn.MultiheadAttention: True = not allowed; scaled_dot_product_attention: True = allowed
                attn_mask = q.new_zeros(attn_mask.shape).masked_fill(attn_mask, float("-inf"))
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.reshape(n, heads, t, s)
            is_causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=base.dropout if self.training else 0.0, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(n, t, width)
        out = self._project(out, base.out_proj.weight, base.out_proj.bias, "o")
        if unbatched:
            out = out.squeeze(0)
        elif not base.batch_first:
            out = out.transpose(0, 1)
        return out, None


def tower_blocks(clip: nn.Module, encoder: str) -> dict[str, nn.ModuleList]:
    """{'text': text resblocks, 'vision': image resblocks} for `encoder` (text, vision or both)."""
    towers = {"text": clip.transformer.resblocks, "vision": clip.visual.transformer.resblocks}
    return {name: blocks for name, blocks in towers.items() if encoder in (name, "both")}


def inject_lora(clip: nn.Module, encoder: str = "both", position: str = "all",
                params: Sequence[str] = ("q", "k", "v"), r: int = 2, alpha: float = 1.0,
                dropout: float = 0.25) -> list[LoRAMultiheadAttention]:
    """Wrap the attention of the chosen blocks (text tower first, as the reference) in LoRA; returns the
    new modules. The original weights are not copied: each wrapper holds its block's own module."""
    check_lora_options(encoder, position, params, r, alpha, dropout)
    layers = []
    for blocks in tower_blocks(clip, encoder).values():
        for i in position_indices(position, len(blocks)):
            block = blocks[i]
            if isinstance(block.attn, LoRAMultiheadAttention):
                raise ConfigError(f"resblock {i} already has LoRA; inject it once")
            if not isinstance(block.attn, nn.MultiheadAttention):
                raise ConfigError(f"resblock {i}'s attn is a {type(block.attn).__name__}, not nn.MultiheadAttention")
            block.attn = LoRAMultiheadAttention(block.attn, params, r, alpha, dropout)
            layers.append(block.attn)
    return layers


def lora_modules(model: nn.Module) -> list[LoRAMultiheadAttention]:
    return [m for m in model.modules() if isinstance(m, LoRAMultiheadAttention)]
