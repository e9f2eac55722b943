"""What a run trains and evaluates a method for: classification over label spaces, or image-text retrieval.

The steps of the loop exist once, here (the shape of open_clip's `CLIPTask` / `SigLIPTask` split): the
LightningModule's `training_step`, `validation_step` and `test_step` hand each batch to the run's task,
which asks the method for its parts - `classification_forward` (logits against the classes a batch
trains on), `encode_images`, `encode_prompts`, `training_loss`, `observe` for a method fitted in
closed form - and does the loss, the metrics and the logging. The datamodule says which task a run
is (`datamodule.task`), so no method branches on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vlm_adapt.backbones.towers import normalize
from vlm_adapt.methods.registry import CLASSIFICATION, RETRIEVAL
from vlm_adapt.metrics.retrieval import contrastive_loss, recall_sum_percent, recalls_from_features

if TYPE_CHECKING:
    from vlm_adapt.methods.base import CLIPMethod


@dataclass
class ClassificationOutput:
    """A training batch through a method: what the loss and the training accuracy need."""

    logits: Tensor  # (B, K) over the K classes this batch trains against
    targets: Tensor  # (B,) indices into those K classes
    text_features: Tensor  # (K, D) their class features (regularisers read them)
    labels: Tensor  # (B,) the true labels in the training label space
    classes: Tensor | None = None  # (K,) the labels of the logits' classes; None: the whole label space
    logs: dict[str, float] = field(default_factory=dict)  # extra per-epoch means, e.g. train/kept_classes

    def predictions(self) -> Tensor:
        """(B,) predicted labels in the training label space (for the training accuracy)."""
        predicted = self.logits.argmax(dim=1)
        return predicted if self.classes is None else self.classes[predicted]


class Task:
    """The steps of one kind of run; `method` is the CLIPMethod being trained or evaluated."""

    name: str

    def training_step(self, method: CLIPMethod, batch: Any) -> Tensor | None:
        raise NotImplementedError

    def validation_step(self, method: CLIPMethod, batch: Any) -> None:
        raise NotImplementedError

    def on_test_epoch_start(self, method: CLIPMethod) -> None:
        """Called before the test loaders run."""

    def test_step(self, method: CLIPMethod, batch: Any, dataloader_idx: int) -> None:
        raise NotImplementedError

    def on_test_epoch_end(self, method: CLIPMethod) -> None:
        """Called after the test loaders ran."""


class ClassificationTask(Task):
    """Cross-entropy against the training label space; accuracy on validation and every test label space.

    A method fitted in closed form (`spec.fit == "closed_form"`, the linear probe) is shown the training
    and validation images through `observe` instead, and fits at the end of its epoch.
    """

    name = CLASSIFICATION

    def training_step(self, method: CLIPMethod, batch: Any) -> Tensor | None:
        if method.spec.fit == "closed_form":
            method.observe("train", *batch[-2:])
            return None
        out = method.classification_forward(batch)
        loss = method.training_loss(out.logits, out.targets, out.text_features)
        batch_size = len(out.labels)
        method.train_acc(out.predictions(), out.labels)
        method.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        method.log("train/acc", method.train_acc, on_step=False, on_epoch=True, batch_size=batch_size)
        for key, value in out.logs.items():
            method.log(key, value, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def validation_step(self, method: CLIPMethod, batch: tuple[Tensor, Tensor]) -> None:
        images, labels = batch
        if method.spec.fit == "closed_form":
            if not method.trainer.sanity_checking:
                method.observe("val", images, labels)
            return
        method.val_acc(method(images, method.train_label_space), labels)
        method.log("val/acc", method.val_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))

    def test_step(self, method: CLIPMethod, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> None:
        space = method.test_label_spaces[dataloader_idx]
        if not method.supports_label_space(space):
            return
        images, labels = batch
        metric = method.test_accs[dataloader_idx]
        metric(method(images, space), labels)
        method.log(f"test/{space.name}/acc", metric, on_epoch=True, add_dataloader_idx=False, batch_size=len(labels))


class RetrievalTask(Task):
    """Symmetric InfoNCE over (image, caption) pairs; recall@K both ways over the whole test split.

    Test loader 0 yields (image index, images), loader 1 (caption index, its image's index, captions);
    the features are gathered over ranks and ranked at the end of the test epoch.
    """

    name = RETRIEVAL

    def __init__(self) -> None:
        self.outputs: dict[str, list[tuple[Tensor, ...]]] = {"images": [], "captions": []}

    def training_step(self, method: CLIPMethod, batch: tuple[Tensor, Tensor, Tensor, list[str]]) -> Tensor:
        image_index, images, caption_index, captions = batch
        image_features = method.encode_images(images, image_index)
        text_features = normalize(method.encode_prompts(list(captions), caption_index))
        loss = contrastive_loss(method.logits(image_features, text_features), image_index)
        method.log("train/loss", loss, prog_bar=True, batch_size=len(image_index))
        return loss

    def validation_step(self, method: CLIPMethod, batch: Any) -> None:
        """A retrieval run has no validation split."""

    def on_test_epoch_start(self, method: CLIPMethod) -> None:
        self.outputs = {"images": [], "captions": []}

    def test_step(self, method: CLIPMethod, batch: Any, dataloader_idx: int) -> None:
        if dataloader_idx == 0:
            image_index, images = batch
            self.outputs["images"].append((image_index, normalize(method.encode_images(images))))
        else:
            caption_index, caption_image, captions = batch
            features = normalize(method.encode_prompts(list(captions)))
            self.outputs["captions"].append((caption_index, caption_image, features))

    def _gathered(self, method: CLIPMethod, name: str) -> list[Tensor]:
        tensors = [torch.cat(parts) for parts in zip(*self.outputs[name], strict=True)]
        if method.trainer.world_size > 1:
            tensors = [method.all_gather(t).flatten(0, 1) for t in tensors]
        return tensors

    def on_test_epoch_end(self, method: CLIPMethod) -> None:
        recalls = recalls_from_features(*self._gathered(method, "images"), *self._gathered(method, "captions"))
        for key, value in recalls.items():
            method.log(f"test/{key}", value, add_dataloader_idx=False)
        method.log("test/rsum", round(recall_sum_percent(recalls), 4), add_dataloader_idx=False)
        self.outputs = {"images": [], "captions": []}


TASK_CLASSES: dict[str, type[Task]] = {CLASSIFICATION: ClassificationTask, RETRIEVAL: RetrievalTask}
