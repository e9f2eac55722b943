"""Linear probe (CLIP paper, CoOp's baseline): L2-regularised logistic regression on frozen,
normalized image features, the regularisation strength chosen on the validation split.

One epoch extracts the features (Lightning's training loop, no optimizer steps), then a full-batch
L-BFGS fit per candidate C picks the head with the best validation accuracy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_adapt.backbones import Backbone
from vlm_adapt.backbones.towers import normalize
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.methods.base import CLIPMethod
from vlm_adapt.methods.registry import CacheSpec, register_method


def fit_logistic_regression(features: Tensor, labels: Tensor, num_classes: int, c: float, max_iter: int) -> nn.Linear:
    """Multinomial logistic regression minimising mean CE + ||W||^2 / (2 C N) (sklearn's objective / N)."""
    head = nn.Linear(features.shape[1], num_classes).to(features.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    penalty = 1.0 / (2.0 * c * len(labels))

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels) + penalty * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return head


@register_method("linear_probe", fit="closed_form",
                 caches=(CacheSpec("normalized image features", "once", augmented=False),))
class LinearProbe(CLIPMethod):

    def __init__(
        self,
        backbone: Backbone,
        c_grid: list[float] | None = None,
        max_iter: int = 300,
        **kwargs: Any,
    ):
        """`c_grid`: inverse regularisation strengths searched on the validation features."""
        super().__init__(backbone, **kwargs)
        self.automatic_optimization = False
        self.c_grid = c_grid or [10.0**k for k in range(-2, 5)]
        self._features: dict[str, list[tuple[Tensor, Tensor]]] = {"train": [], "val": []}

    def on_label_spaces_attached(self) -> None:
        self.head = nn.Linear(self.clip.visual.output_dim, self.train_label_space.num_classes)

    def configure_optimizers(self) -> None:
        return None  # the head is fitted in closed loop by L-BFGS at the end of the epoch

    def supports_label_space(self, space: LabelSpace) -> bool:
        return space.classnames == self.train_label_space.classnames

    def _image_features(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return normalize(self.towers.encode_image(images)).float()

    def forward(self, images: Tensor, space: LabelSpace) -> Tensor:
        return self.head(self._image_features(images))

    def observe(self, split: str, images: Tensor, labels: Tensor) -> None:
        """The classification task shows the training and validation images here; fitted at epoch end."""
        self._features[split].append((self._image_features(images), labels))

    def _gathered(self, split: str) -> tuple[Tensor, Tensor] | None:
        if not self._features[split]:
            return None
        features = torch.cat([f for f, _ in self._features[split]])
        labels = torch.cat([y for _, y in self._features[split]])
        self._features[split].clear()
        # every rank fits the same head on the features of all ranks
        features, labels = self.all_gather(features), self.all_gather(labels)
        return features.reshape(-1, features.shape[-1]), labels.reshape(-1)

    def on_train_epoch_end(self) -> None:
        train, val = self._gathered("train"), self._gathered("val")
        num_classes = self.train_label_space.num_classes
        best_head, best_acc, best_c = None, -1.0, None
        for c in self.c_grid if val is not None else [self.c_grid[len(self.c_grid) // 2]]:
            head = fit_logistic_regression(*train, num_classes, c, self.hparams.max_iter)
            acc = (head(val[0]).argmax(1) == val[1]).float().mean().item() if val is not None else 0.0
            if acc > best_acc:
                best_head, best_acc, best_c = head, acc, c
        self.head.load_state_dict(best_head.state_dict())
        self.log("train/best_c", float(best_c))
        if val is not None:
            self.log("val/acc", best_acc)
