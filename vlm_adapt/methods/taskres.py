"""TaskRes (Yu et al., CVPR 2023): a learned residual added to CLIP's frozen zero-shot classifier.

As the reference (geekyutao/TaskRes trainers/taskres.py, `TaskResLearner` and `CustomCLIP`), for the C
training classes:

    t0 = each class's text features averaged over its templates (not normalized before the mean),
    logits = exp(logit_scale) * norm(f) @ norm(t0 + alpha * x)^T,

f the frozen image feature and x (C x D) the task residual, zero at the start and the only thing that trains;
the classifier is normalized after the residual is added. alpha is the reference's RESIDUAL_SCALE (0.5; 1.0 on
Flowers102 in its scripts). t0 uses the dataset's template (CoOp's, the reference's CUSTOM_TEMPLATES) and, on
ImageNet, the seven IMAGENET_TEMPLATES_SELECT plus "a photo of a {}." (`templates`, set by the experiments).
Both towers run without autograd and the text tower once per label space, so with x = 0 the logits are
zero-shot CLIP's (exactly so with one template). Trainable: C x D (1000 x 512 = 512,000 on ImageNet at
ViT-B/16). The enhanced base of TaskRes* (t0 from a text projection trained beforehand, the reference's
downloaded `strong_base` weights) is not implemented.

Other label spaces. A test label space whose classes are all training classes is scored with those classes'
rows of the trained classifier, t0 included: the reference evaluates ImageNet-V2 and -Sketch by loading the
ImageNet checkpoint's `base_text_features` and `text_feature_residuals` whole, and ImageNet-A and -R by keeping
the rows of their 200 classes, matched by class name (`imagenet_a_r_indexes_v2.py`: the first ImageNet class of
each name). A label space holding a class the model never trained (base-to-new's new classes, another dataset's
classes; the paper evaluates neither) has no residual: it is scored with its own base classifier t0 - its own
templates, x = 0, i.e. zero-shot CLIP - or left unscored with `other_label_spaces: skip`.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn

from vlm_adapt.backbones import Backbone
from vlm_adapt.backbones.towers import normalize
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.registry import register_method

log = logging.getLogger(__name__)

OTHER_LABEL_SPACES = ("zero_shot", "skip")


@register_method("taskres")
class TaskRes(CLIPMethod):

    def __init__(
        self,
        backbone: Backbone,
        alpha: float = 0.5,
        templates: list[str] | None = None,
        other_label_spaces: str = "zero_shot",
        **kwargs: Any,
    ):
        """`alpha`: the residual's scale; `templates`: the templates t0 of the training classes averages instead
        of the dataset's own (the reference's eight on ImageNet); `other_label_spaces`: how a label space with
        classes outside the training ones is scored, `zero_shot` (its own t0, no residual) or `skip`."""
        if not alpha > 0:
            raise ConfigError(f"method.module.alpha={alpha!r}: the residual's scale must be positive (0.5 in the "
                              "reference, 1.0 on Flowers102)")
        if other_label_spaces not in OTHER_LABEL_SPACES:
            raise ConfigError(f"method.module.other_label_spaces={other_label_spaces!r}: pick "
                              f"{' or '.join(OTHER_LABEL_SPACES)}")
        super().__init__(backbone, **kwargs)
        self.alpha = float(alpha)
        # x: one row per training class, (re)made for the training label space by on_label_spaces_attached
        self.text_feature_residuals = nn.Parameter(torch.zeros(0, self.clip.visual.output_dim))
        self._residual_space: LabelSpace | None = None
        self._base_features: dict[LabelSpace, Tensor] = {}
        self._rows: dict[LabelSpace, list[int] | None] = {}
        log.info("TaskRes trains a C x %d residual (alpha %.2f) on the frozen zero-shot classifier",
                 self.clip.visual.output_dim, alpha)

    def on_label_spaces_attached(self) -> None:
        self._rows.clear()
        space = self.train_label_space
        if space != self._residual_space:  # a residual belongs to one training label space
            like = self.text_feature_residuals
            rows = space.num_classes if space is not None else 0
            self.text_feature_residuals = nn.Parameter(
                torch.zeros(rows, like.shape[1], dtype=like.dtype, device=like.device))
            self._residual_space = space

    # ------------------------------------------------------------ the classifier
    def base_text_features(self, space: LabelSpace) -> Tensor:
        """t0 of `space`, (C, D): each class's text features averaged over the templates, unnormalized (the
        reference's `_get_base_text_features`). Computed once per label space: the text tower is frozen."""
        cached = self._base_features.get(space)
        if cached is None or cached.device != self.device:
            with torch.no_grad():
                features = self.encode_prompts(space.prompts())
            cached = features.view(space.num_classes, len(space.templates), -1).mean(dim=1)
            self._base_features[space] = cached
        return cached

    @property
    def training_base_space(self) -> LabelSpace:
        """The training classes prompted with t0's templates."""
        return self.train_label_space.with_templates(self.hparams.templates)

    def training_rows(self, space: LabelSpace) -> list[int] | None:
        """The trained classifier's row of each class of `space`, or None when `space` holds a class that is
        not a training class. Matched by class name, the first training class of a name (as the reference's
        ImageNet-A/-R indices); a label space of the training classes in their order maps row to row."""
        if space not in self._rows:
            self._rows[space] = self._match_rows(space)
        return self._rows[space]

    def _match_rows(self, space: LabelSpace) -> list[int] | None:
        train = self.train_label_space
        if train is None:
            return None
        if space.classnames == train.classnames:
            return list(range(train.num_classes))
        first: dict[str, int] = {}
        for row, name in enumerate(train.classnames):
            first.setdefault(name, row)
        if not all(name in first for name in space.classnames):
            return None
        repeated = Counter(train.classnames)
        ambiguous = sorted({name for name in space.classnames if repeated[name] > 1})
        if ambiguous:
            log.warning("TaskRes: %s of label space %s name several training classes; each takes the first one's "
                        "row, as the reference's index lookup does", ", ".join(map(repr, ambiguous)), space.name)
        log.info("TaskRes: label space %s (%d classes) is scored with its classes' rows of the trained classifier",
                 space.name, space.num_classes)
        return [first[name] for name in space.classnames]

    def class_text_features(self, space: LabelSpace) -> Tensor:
        """norm(t0 + alpha x) for the training classes (rows of it for a label space of training classes),
        norm(t0) of its own for any other label space."""
        rows = self.training_rows(space)
        if rows is None:
            return normalize(self.base_text_features(space))
        residuals = self.text_feature_residuals
        classifier = self.base_text_features(self.training_base_space).to(residuals.dtype) + self.alpha * residuals
        if space.classnames != self.train_label_space.classnames:
            classifier = classifier[torch.tensor(rows, device=classifier.device)]
        return normalize(classifier)

    def supports_label_space(self, space: LabelSpace) -> bool:
        return self.hparams.other_label_spaces == "zero_shot" or self.training_rows(space) is not None
