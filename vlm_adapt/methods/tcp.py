"""TCP (Yao et al., CVPR 2024): class-aware prompt tokens made from textual knowledge, inside the text tower.

The learned prompt is [SOS] ctx_1 .. ctx_M <tail with the class name> [EOT], M = 4 context vectors N(0, 0.02)
(the reference's TCP config leaves CTX_INIT off) and a per-dataset tail (e.g. "{}, a type of pet.").
The class-level textual knowledge of class c is k_c, CLIP's normalized zero-shot text feature of the dataset's
hand-crafted prompt (e.g. "a photo of a {}, a type of pet."). The Textual Knowledge Embedding (TKE) maps it to
K = 4 class-aware tokens,

    TKE(k_c) = W2 QuickGELU(W1 k_c + b1) + b2,   W1: D -> D / 4,  W2: D / 4 -> K x width,  reshaped to (K, width),

and before text block l (l = 8 of 12: after the first 8 blocks) the tokens at positions 1 .. K become
w TKE(k_c) + (1 - w) x[1 .. K] (w = 1: replaced). The loss adds KgCoOp's knowledge-guided term:

    L = CE + lambda (1 - mean_c cos(t_c, k_c)),   lambda = 8.

Every label space gets its tokens from its own classes' knowledge, so unseen classes at test time get theirs.
Trainable at ViT-B/16 (D = 512, width 512): ctx 4 x 512 + W1, b1 (512 x 128 + 128) + W2, b2 (128 x 2,048 +
2,048) = 2,048 + 65,664 + 264,192 = 331,904.

As the reference (htyao89/Textual-based_Class-aware_prompt_tuning trainers/tcp.py, trainers/clip_text/model.py):
the hand-crafted prompts are its CUSTOM_TEMPLATES_ori and the tails come from its CUSTOM_TEMPLATES
(`templates: reference`), looked up by dataset: a label space named after a dataset (a test set, a
cross-dataset target) uses its own name, the training label space and its base / new subsets the `dataset`
option (the run's `data.name`). A dataset the tables do not list keeps its label space's templates and
CoOp's tail "{}." (as `templates: label_space` does everywhere).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from open_clip.transformer import QuickGELU
from torch import Tensor, nn

from vlm_adapt.backbones import Backbone
from vlm_adapt.backbones.towers import normalize
from vlm_adapt.data.base_new import SUBSETS
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.data.templates import TCP as KNOWLEDGE_TEMPLATES
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.kgcoop import KgCoOp
from vlm_adapt.methods.registry import register_method

# trainers/tcp.py CUSTOM_TEMPLATES: the learned prompt is "X X X X <tail>", the context replacing the four
# X's; UCF101's and the ImageNets' templates begin "a photo of a" instead, four single tokens the context
# replaces just the same ("a photo of a person doing {}." -> ctx "person doing {}.")
PROMPT_TAILS = {
    "oxford_pets": "{}, a type of pet.",
    "oxford_flowers": "{}, a type of flower.",
    "fgvc_aircraft": "{}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "{}.",
    "stanford_cars": "{}, a type of car",
    "food101": "{}, a type of food.",
    "sun397": "{}.",
    "caltech101": "{}.",
    "ucf101": "person doing {}.",
    "imagenet": "{}.",
    "imagenet_sketch": "{}.",
    "imagenet_v2": "{}.",
    "imagenet_a": "{}.",
    "imagenet_r": "{}.",
}
COOP_TAIL = "{}."
TEMPLATE_CHOICES = ("reference", "label_space")
# label spaces named after their role in the run (the datamodule's), not after a dataset
TRAINING_SPACE_NAMES = ("train", *SUBSETS)


def _integer_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


@register_method("tcp")
class TCP(KgCoOp):

    def __init__(
        self,
        backbone: Backbone,
        n_ctx: int = 4,
        ctx_init: str | None = None,
        class_tokens: int = 4,
        reduction: int = 4,
        insert_layer: int = 8,
        class_token_weight: float = 1.0,
        reg_weight: float = 8.0,
        templates: str = "reference",
        dataset: str | None = None,
        class_token_position: str = "end",
        csc: bool = False,
        **kwargs: Any,
    ):
        """`class_tokens`: K, the TKE's tokens per class (they replace positions 1 .. K, so K <= n_ctx);
        `reduction`: the TKE's bottleneck D / reduction; `insert_layer`: the text block whose input gets the
        class-aware tokens (0 = the embeddings); `class_token_weight`: w of w TKE + (1 - w) x; `reg_weight`:
        lambda of the knowledge-guided term; `templates`: `reference` (the reference's per-dataset prompts) or
        `label_space` (the label space's templates and CoOp's prompt); `dataset`: the training data's name."""
        if class_token_position != "end" or csc:
            raise ConfigError("TCP's prompt is [SOS] ctx <class tail> [EOT] with one shared context: "
                              "method.module.class_token_position must be end and method.module.csc false.")
        if templates not in TEMPLATE_CHOICES:
            raise ConfigError(f"method.module.templates must be one of {TEMPLATE_CHOICES}, got {templates!r}.")
        if float(reg_weight) < 0:
            raise ConfigError(f"method.module.reg_weight is the knowledge-guided term's weight and must be >= 0, "
                              f"got {reg_weight!r}.")
        if not 0.0 <= float(class_token_weight) <= 1.0:
            raise ConfigError(f"method.module.class_token_weight mixes w TKE + (1 - w) x and must be in [0, 1], "
                              f"got {class_token_weight!r}.")
        super().__init__(backbone, reg_weight=reg_weight, n_ctx=n_ctx, ctx_init=ctx_init, **kwargs)
        depth = self.towers.num_text_layers
        if not _integer_in(insert_layer, 0, depth - 1):
            raise ConfigError(f"method.module.insert_layer must be a text block 0..{depth - 1} (this backbone's text "
                              f"tower has {depth} blocks), got {insert_layer!r}.")
        if not _integer_in(class_tokens, 1, self.n_ctx):
            raise ConfigError(f"method.module.class_tokens must be 1..n_ctx={self.n_ctx} (the class-aware tokens "
                              f"replace context positions, never the class name), got {class_tokens!r}.")
        embed_dim = self.clip.visual.output_dim  # the text features' width (the reference's vis_dim)
        if not _integer_in(reduction, 1, embed_dim):
            raise ConfigError(f"method.module.reduction must be an integer 1..{embed_dim} (the TKE's bottleneck is "
                              f"{embed_dim} / reduction wide), got {reduction!r}.")
        self.class_tokens = class_tokens
        self.insert_layer = insert_layer
        self.class_token_weight = float(class_token_weight)
        self.templates = templates
        self.dataset_name = dataset
        self.tke = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(embed_dim, embed_dim // reduction)),
            ("act", QuickGELU()),
            ("linear2", nn.Linear(embed_dim // reduction, class_tokens * self.towers.text_width)),
        ]))
        self._knowledge: dict[LabelSpace, Tensor] = {}
        self._tcp_tokens: dict[LabelSpace, Tensor] = {}

    # ------------------------------------------------------------ the reference's per-dataset prompts
    def dataset_of(self, space: LabelSpace) -> str | None:
        """The dataset a label space's classes come from: its name, or the training data's for the run's
        own spaces (train, base, new)."""
        return self.dataset_name if space.name in TRAINING_SPACE_NAMES else space.name

    def knowledge_space(self, space: LabelSpace) -> LabelSpace:
        """`space` prompted with the hand-crafted template of its class-level knowledge."""
        template = KNOWLEDGE_TEMPLATES.get(self.dataset_of(space)) if self.templates == "reference" else None
        return space.with_templates([template] if template else None)

    def prompt_tail(self, space: LabelSpace) -> str:
        """What follows the context in the learned prompt, "{}" standing for the class name."""
        if self.templates == "reference":
            return PROMPT_TAILS.get(self.dataset_of(space), COOP_TAIL)
        return COOP_TAIL

    def prompt_tokens(self, space: LabelSpace) -> Tensor:
        """Token ids of "X .. X <tail>" per class, one placeholder X per context vector."""
        if space not in self._tcp_tokens:
            tail, xs = self.prompt_tail(space), " ".join(["X"] * self.n_ctx)
            self._tcp_tokens[space] = self.tokenizer([f"{xs} {tail.format(name)}" for name in space.classnames])
        return self._tcp_tokens[space].to(self.device)

    # ------------------------------------------------------------ knowledge and class-aware tokens
    def zero_shot_label_space(self, space: LabelSpace) -> Tensor:
        """k: (C, D) normalized zero-shot features of the knowledge prompts (KgCoOp's t0 hook)."""
        return CLIPMethod.encode_label_space(self, self.knowledge_space(space))

    def class_knowledge(self, space: LabelSpace) -> Tensor:
        """k of `space`, encoded once (the frozen tower gives the same features any time)."""
        anchor = self.text_anchor
        if anchor.features is not None and anchor.space == space:
            return anchor.features
        if space not in self._knowledge:
            with torch.no_grad():
                self._knowledge[space] = self.zero_shot_label_space(space).detach()
        self._knowledge[space] = self._knowledge[space].to(self.device)
        return self._knowledge[space]

    def class_aware_tokens(self, space: LabelSpace) -> Tensor:
        """(C, K, width): TKE(k_c) of every class of `space`."""
        knowledge = self.class_knowledge(space)
        return self.tke(knowledge).view(len(knowledge), self.class_tokens, -1)

    def class_token_edit(self, tokens: Tensor) -> Callable[[Tensor], Tensor]:
        """Positions 1 .. K of the tokens entering the insertion block become w TKE + (1 - w) x."""
        k, w = self.class_tokens, self.class_token_weight

        def edit(x: Tensor) -> Tensor:
            mixed = w * tokens.to(x.dtype) + (1.0 - w) * x[:, 1 : 1 + k]
            return torch.cat([x[:, :1], mixed, x[:, 1 + k :]], dim=1)

        return edit

    def encode_label_space(self, space: LabelSpace) -> Tensor:
        tokens = self.prompt_tokens(space)
        positions = torch.arange(1, 1 + self.n_ctx, device=tokens.device).expand(len(tokens), -1)
        class_tokens = self.class_aware_tokens(space)

        def encode(classes: Tensor, eot: Tensor) -> Tensor:
            words = self.prompt_embeddings(tokens[classes], positions[classes], classes)
            edits = {self.insert_layer: self.class_token_edit(class_tokens[classes])}
            return self.towers.encode_text_embeddings(words, eot, edits)

        classes = torch.arange(len(tokens), device=tokens.device)
        features = self.towers.encode_in_chunks(encode, classes, self.towers.eot_index(tokens),
                                                self.hparams.text_chunk_size)
        return normalize(features)
