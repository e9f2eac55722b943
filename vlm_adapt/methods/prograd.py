"""ProGrad (Zhu et al., ICCV 2023): CoOp whose gradient is kept off the direction that conflicts with
zero-shot CLIP's predictions.

The prompt is CoOp's, [SOS] ctx_1 .. ctx_M <class name tokens> . [EOT], with M = 16 context vectors
(16 x 512 = 8,192 trainable at ViT-B/16); everything of CLIP stays frozen. Each step takes two gradients
of the context (BeierZhu/Prompt-align, trainers/prograd.py `ProGradLoss` and Dassl.ProGrad's
`prograd_backward_and_update`):

    g_ce = d CE(logits, y) / d ctx
    g_kl = d KL / d ctx,   KL = T^2 * mean_b sum_c -softmax(z0 / T)_c * log_softmax(z / T)_c

where z are the learned prompt's logits and z0 zero-shot CLIP's (the label space's hand-crafted template,
e.g. "a photo of a {}.", encoded by the frozen towers, times CLIP's logit scale); the KL is written as the
reference writes it, the cross-entropy to the soft zero-shot targets (the KL plus the targets' entropy,
a constant: the same gradient). Per parameter tensor, as the reference loops over the prompt learner's
parameters (the context is the only one), the update direction is

    g = g_ce - lambda (g_ce . u) u,  u = g_kl / |g_kl|,   if g_ce / |g_ce| . u < 0,   else g = g_ce.

How it runs on the shared loop (no `training_step` of its own): `training_loss` returns the CE, whose
`backward` Lightning runs, and takes g_kl before it with `torch.autograd.grad(KL, params, retain_graph=True)`;
`on_after_backward` (after `loss.backward()`, before gradient clipping and the optimizer step) projects the
parameters' `.grad` with it. Under `16-mixed` the CE gradient arrives scaled by the GradScaler's scale s and
is unscaled after this hook: the KL is scaled by the same s before its gradient is taken (so fp16 gradients
underflow alike), the projection is positively homogeneous in g_ce and invariant to the scale of g_kl, so
projecting s g_ce gives s g; a non-finite g_kl then makes the step one the scaler skips (as it does for a
non-finite CE gradient) instead of an unprojected one. Under DDP the `.grad` arrives averaged over the ranks
and g_kl would be each rank's own: it is averaged over the ranks too (`strategy.reduce`), so every rank
projects the same global-batch gradients (the reference's single process on the whole batch). Gradient
accumulation (the `.grad` of several backwards against one g_kl) and sharded strategies (FSDP, DeepSpeed:
`.grad` is a shard) are refused.

Context initialisation (the reference's `CTX_INIT`): `ctx_init: template` takes each label space's template
without its " {}." (e.g. "a photo of a"), k = its word count (`len(words.split(" "))`), M - k zero vectors
followed by the embeddings of the phrase's first k tokens; the prompt is "X .. X <phrase> <class>." with the
first M positions the context, so a phrase of more tokens than words ("pet," is two) keeps its last tokens
as fixed words before the class name. Other label spaces (new classes, cross-dataset targets) are prompted
with their own template's phrase in the same way. `ctx_init: <words>` uses those words for every label
space; `ctx_init: null` is CoOp's N(0, 0.02) context (and CoOp's class-token positions and CSC).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from torch import Tensor, nn

from vlm_adapt.backbones import Backbone
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.coop import CoOp
from vlm_adapt.methods.registry import register_method
from vlm_adapt.methods.regularizers import TextFeatureAnchor
from vlm_adapt.methods.tasks import ClassificationOutput

FROM_TEMPLATE = "template"
TEMPLATE_END = " {}."


def prograd_kl(logits: Tensor, zero_shot_logits: Tensor, temperature: float) -> Tensor:
    """The reference's `ProGradLoss` KL term: T^2 * mean over the batch of the cross-entropy from the soft
    zero-shot predictions softmax(z0 / T) to log_softmax(z / T)."""
    targets = F.softmax(zero_shot_logits / temperature, dim=-1)
    per_sample = -(targets * F.log_softmax(logits / temperature, dim=-1)).sum(dim=1)
    return per_sample.mean() * temperature * temperature


def project_conflicting(ce_grad: Tensor, kl_grad: Tensor, lambda_: float) -> tuple[Tensor, Tensor]:
    """(update direction, whether the two gradients conflict) for one parameter tensor, in float32:
    g_ce - lambda (g_ce . u) u with u = g_kl / |g_kl| when g_ce / |g_ce| . u < 0, else g_ce (the reference's
    test, so a zero or non-finite gradient, whose normalization is NaN, leaves g_ce unchanged)."""
    a, b = ce_grad.float().flatten(), kl_grad.float().flatten()
    b_unit = b / torch.linalg.norm(b)
    conflict = torch.dot(a / torch.linalg.norm(a), b_unit) < 0
    projected = a - lambda_ * torch.dot(a, b_unit) * b_unit
    return torch.where(conflict, projected, a).view_as(ce_grad).to(ce_grad.dtype), conflict


@register_method("prograd")
class ProGrad(CoOp):

    def __init__(
        self,
        backbone: Backbone,
        lambda_: float = 1.0,
        temperature: float = 1.0,
        n_ctx: int = 16,
        ctx_init: str | None = FROM_TEMPLATE,
        class_token_position: str = "end",
        csc: bool = False,
        **kwargs: Any,
    ):
        """`lambda_`: how much of the conflicting component is removed (the reference's LOSS.LAMBDA, 1.0;
        0.8 for its 8 and 16 shots on Flowers102, DTD and EuroSAT), in [0, 1] (0 is CoOp). `temperature`: T of
        the KL term (LOSS.T, 1.0). `ctx_init`: `template` (the reference's CTX_INIT True: each label space's
        template phrase after M - k zero vectors), words used that way for every label space, or null (CoOp's
        random context). `n_ctx`: M, the number of context vectors (16) whatever the initialisation."""
        if isinstance(lambda_, bool) or not (isinstance(lambda_, int | float) and math.isfinite(lambda_)
                                             and 0.0 <= lambda_ <= 1.0):
            raise ConfigError(f"method.module.lambda_ must be a number in [0, 1] (the share of the conflicting "
                              f"gradient component removed; the reference uses 1.0), got {lambda_!r}")
        if isinstance(temperature, bool) or not (isinstance(temperature, int | float) and math.isfinite(temperature)
                                                 and temperature > 0):
            raise ConfigError(f"method.module.temperature must be a positive number (the reference's LOSS.T, 1.0), "
                              f"got {temperature!r}")
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise ConfigError(f"method.module.n_ctx must be a positive number of context vectors, got {n_ctx!r}")
        if ctx_init is not None and not isinstance(ctx_init, str):
            raise ConfigError(f"method.module.ctx_init must be 'template' (the reference's CTX_INIT: True), words, "
                              f"or null (CTX_INIT: False), got {ctx_init!r}")
        ctx_init = ctx_init or None
        if ctx_init is not None and (csc or class_token_position != "end"):
            raise ConfigError(
                "method.module.ctx_init places the words before the class name (class_token_position=end, one "
                "generic context, as the reference's CTX_INIT); set ctx_init=null for csc=true or another "
                "class_token_position."
            )
        super().__init__(backbone, n_ctx=n_ctx, ctx_init=None, class_token_position=class_token_position,
                         csc=csc, **kwargs)
        self.lambda_ = float(lambda_)
        self.temperature = float(temperature)
        self.ctx_init = ctx_init
        self._phrase_tokens: dict[LabelSpace, tuple[Tensor, Tensor]] = {}
        if ctx_init is not None:
            self.ctx = nn.Parameter(torch.zeros(n_ctx, self.clip.token_embedding.weight.shape[1]))
            if ctx_init != FROM_TEMPLATE:
                self._initialise_context(ctx_init)
        # the template phrase is known once the training label space is; a loaded checkpoint brings the context
        self._context_pending = ctx_init == FROM_TEMPLATE
        # the zero-shot classifier: the training label space's hand-crafted prompts through the frozen towers
        self.zero_shot_anchor = TextFeatureAnchor()
        self._zero_shot_logits: Tensor | None = None
        self._kl_grads: list[Tensor] | None = None

    # ------------------------------------------------------------ the prompt
    def context_phrase(self, space: LabelSpace) -> str | None:
        """The words of `space`'s prompt between the placeholders and the class name (None: CoOp's prompt)."""
        if self.ctx_init != FROM_TEMPLATE:
            phrase = self.ctx_init
        else:
            templates = space.templates
            if len(templates) != 1 or not templates[0].endswith(TEMPLATE_END) or templates[0].count("{}") != 1:
                raise ConfigError(
                    f"method.module.ctx_init=template initialises the context from one template ending in "
                    f"'{TEMPLATE_END}' per label space, as the reference's CUSTOM_TEMPLATES; label space "
                    f"{space.name!r} has {list(templates)}. Use prompt_templates=prograd (the reference's templates), "
                    "or ctx_init=<words> / ctx_init=null."
                )
            phrase = templates[0][: -len(TEMPLATE_END)]
        if phrase is not None and len(phrase.split(" ")) > self.n_ctx:
            raise ConfigError(f"the context phrase {phrase!r} has more words than method.module.n_ctx={self.n_ctx} "
                              "context vectors; raise n_ctx or shorten the words.")
        return phrase

    def _initialise_context(self, phrase: str) -> None:
        """M - k zero vectors, then the embeddings of the phrase's first k tokens (k = its word count)."""
        k = len(phrase.split(" "))
        with torch.no_grad():
            words = self.towers.token_embeddings(self.tokenizer([phrase]))[0, 1 : 1 + k]
            self.ctx.zero_()
            self.ctx[self.n_ctx - k :] = words.to(self.ctx.device, self.ctx.dtype)

    def on_label_spaces_attached(self) -> None:
        super().on_label_spaces_attached()
        self.zero_shot_anchor.keep_only(self.train_label_space)
        self._phrase_tokens.clear()
        spaces = [s for s in (self.train_label_space, *self.test_label_spaces) if s is not None]
        for space in spaces:  # a label space the context cannot prompt fails now, not after training
            self.context_phrase(space)
        if self._context_pending and self.train_label_space is not None:
            self._initialise_context(self.context_phrase(self.train_label_space))
            self._context_pending = False

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._context_pending = False  # the trained context comes with the checkpoint

    def _tokens(self, space: LabelSpace) -> tuple[Tensor, Tensor]:
        """The prompts "X .. X <phrase> <class>." (M - k placeholders) and the context at positions 1..M."""
        phrase = self.context_phrase(space)
        if phrase is None:
            return super()._tokens(space)
        if space not in self._phrase_tokens:
            prefix = " ".join(["X"] * (self.n_ctx - len(phrase.split(" "))) + [phrase])
            tokens = self.tokenizer([f"{prefix} {name}." for name in space.classnames])
            positions = torch.arange(1, 1 + self.n_ctx).expand(len(tokens), -1)
            if bool((self.towers.eot_index(tokens) <= self.n_ctx).any()):
                raise ConfigError(f"the context phrase {phrase!r} has fewer tokens than words; write it with "
                                  "single spaces between words.")
            self._phrase_tokens[space] = (tokens, positions)
        tokens, positions = self._phrase_tokens[space]
        return tokens.to(self.device), positions.to(self.device)

    # ------------------------------------------------------------ the two losses
    def zero_shot_features(self) -> Tensor:
        """(C, D) zero-shot CLIP's class features of the training label space (computed once)."""
        return self.zero_shot_anchor.store(self.train_label_space, lambda space: CLIPMethod.encode_label_space(self,
                                                                                                               space))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self._check_trainer()
            if self.train_label_space is not None:
                self.zero_shot_features()

    def _check_trainer(self) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        if trainer.accumulate_grad_batches != 1:
            raise ConfigError(
                "ProGrad projects each step's gradient with that step's KL gradient; with "
                f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} the .grad of several batches "
                "would be projected with one batch's. Use trainer.accumulate_grad_batches=1 (a larger "
                "method.batch_size, or more devices, for a larger batch)."
            )
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, SingleDeviceStrategy | DDPStrategy):
            raise ConfigError(
                f"ProGrad projects whole gradients, which the {type(strategy).__name__} strategy shards; use one "
                "device or DDP (trainer=ddp)."
            )

    def classification_forward(self, batch: Any) -> ClassificationOutput:
        """The learned prompt's logits, keeping zero-shot CLIP's logits of the same images for the KL term."""
        index, images, labels = batch if len(batch) == 3 else (None, *batch)
        image_features = self.encode_images(images, index)
        text_features = self.class_text_features(self.train_label_space)
        with torch.no_grad():
            self._zero_shot_logits = self.logits(image_features, self.zero_shot_features())
        return ClassificationOutput(self.logits(image_features, text_features), labels, text_features, labels)

    def kl_loss(self, logits: Tensor, zero_shot_logits: Tensor) -> Tensor:
        return prograd_kl(logits, zero_shot_logits, self.temperature)

    def training_loss(self, logits: Tensor, labels: Tensor, text_features: Tensor) -> Tensor:
        """The CE (whose backward the loop runs); the KL term's gradient is taken here and kept for
        `on_after_backward`."""
        zero_shot, self._zero_shot_logits = self._zero_shot_logits, None
        if zero_shot is None:
            raise RuntimeError("ProGrad's training_loss needs the zero-shot logits of classification_forward's batch")
        kl = self.kl_loss(logits, zero_shot)
        params = self._projected_parameters()
        self._kl_grads = None
        if torch.is_grad_enabled() and logits.requires_grad and params:
            scaler = self._grad_scaler()
            grads = torch.autograd.grad(scaler.scale(kl) if scaler is not None else kl, params,
                                        retain_graph=True, allow_unused=True)
            self._kl_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        if self._trainer is not None:
            self.log("train/kl", kl.detach(), batch_size=len(labels))
        return F.cross_entropy(logits, labels)

    # ------------------------------------------------------------ the projection
    def _projected_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _grad_scaler(self) -> Any:
        """The precision plugin's GradScaler (16-mixed), else None."""
        return getattr(self._trainer.precision_plugin, "scaler", None) if self._trainer is not None else None

    def on_after_backward(self) -> None:
        """Replace each trainable tensor's CE gradient by its projection off the conflicting KL direction."""
        kl_grads, self._kl_grads = self._kl_grads, None
        params = self._projected_parameters()
        if kl_grads is None or len(kl_grads) != len(params):
            raise RuntimeError("ProGrad's KL gradient of this step is missing: training_loss must run before backward")
        if self._trainer is not None and self.trainer.world_size > 1:
            # .grad is the mean over the ranks (DDP's all-reduce in backward); g_kl must be too
            flat = self.trainer.strategy.reduce(torch.cat([g.flatten() for g in kl_grads]), reduce_op="mean")
            kl_grads = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in kl_grads]), kl_grads,
                                                           strict=True)]
        # under a GradScaler an overflowing KL gradient makes the step one the scaler skips
        kl_finite = torch.stack([torch.isfinite(g).all() for g in kl_grads]).all() if self._grad_scaler() else None
        conflicts = []
        for p, kl_grad in zip(params, kl_grads, strict=True):
            if p.grad is None:
                continue
            update, conflict = project_conflicting(p.grad, kl_grad, self.lambda_)
            if kl_finite is not None:
                update = torch.where(kl_finite, update, torch.full_like(update, float("inf")))
            p.grad.copy_(update)
            conflicts.append(conflict.float())
        if conflicts and self._trainer is not None:
            self.log("train/grad_conflict", torch.stack(conflicts).mean(), on_step=False, on_epoch=True, batch_size=1)
