"""The shared LightningModule: prompting, logits, loss, metrics, optimizer, checkpoint trimming.

A method subclasses `CLIPMethod` and says which parameters train (`select_trainable`) and, where
it differs from plain CLIP, how images and label spaces are encoded or what the loss adds.
Checkpoints hold only the trainable parameters plus the identity of the backbone they belong to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, ClassVar

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Sampler
from torchmetrics.classification import MulticlassAccuracy

from vlm_adapt.backbones import Backbone, CLIPTowers
from vlm_adapt.backbones.towers import normalize
from vlm_adapt.checkpoints import CHECKPOINT_KEY
from vlm_adapt.data.captions import CaptionRetrievalDataModule
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.errors import BackboneMismatchError, ConfigError
from vlm_adapt.methods.param_groups import build_param_groups
from vlm_adapt.methods.schedulers import build_scheduler
from vlm_adapt.metrics.retrieval import contrastive_loss, recall_sum_percent, recalls_from_features

log = logging.getLogger(__name__)


class CLIPMethod(L.LightningModule):
    """Classification with CLIP: logits = exp(logit_scale) * cos(image, class text features)."""

    method_name: ClassVar[str] = "clip"
    trains: ClassVar[bool] = True
    # image-text retrieval (protocol=retrieval): for methods whose image and caption encoders are the
    # adapted model itself (not prompt learners tied to class names)
    supports_retrieval: ClassVar[bool] = False

    def __init__(
        self,
        backbone: Backbone,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        scheduler_interval: str = "epoch",
        text_chunk_size: int = 256,
        truncate_text: bool = True,
        param_groups: dict[str, dict[str, Any]] | None = None,
        no_decay_names: list[str] | None = None,
    ):
        """`text_chunk_size`: prompts encoded at once; `truncate_text`: run the text tower only up to
        the longest prompt of each chunk (exact, since the tower is causal; False reproduces open_clip's
        full 77-position cost). `param_groups`, `no_decay_names`: per-part optimizer options
        (`vlm_adapt/methods/param_groups.py`)."""
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.clip = backbone.model
        self.tokenizer = backbone.tokenizer
        self.backbone_identity = dict(backbone.identity)
        self.towers = CLIPTowers(self.clip, truncate_text)
        self.strict_loading = False  # checkpoints hold only the trainable parameters
        self.train_label_space: LabelSpace | None = None
        self.test_label_spaces: list[LabelSpace] = []
        self._text_cache: dict[str, Tensor] = {}
        self.retrieval = False  # set in setup() from the datamodule
        self._retrieval_outputs: dict[str, list[tuple[Tensor, ...]]] = {"images": [], "captions": []}
        self.clip.requires_grad_(False)
        self.select_trainable()

    # ------------------------------------------------------------ method hooks
    def select_trainable(self) -> None:
        """Set requires_grad on what this method trains (everything starts frozen)."""

    def text_features_need_grad(self) -> bool:
        """Whether class text features change during training (then they are re-encoded per step)."""
        return any(p.requires_grad for n, p in self.clip.named_parameters() if not n.startswith("visual."))

    def image_features_need_grad(self) -> bool:
        return any(p.requires_grad for p in self.clip.visual.parameters())

    def encode_images(self, images: Tensor, index: Tensor | None = None) -> Tensor:
        """Image features; `index` (training samples' dataset indices) lets caching methods reuse work."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.image_features_need_grad()):
            return self.towers.encode_image(images)

    def encode_prompts(self, prompts: list[str], index: Tensor | None = None) -> Tensor:
        """Unnormalized text features of prompts or captions, encoded in chunks of `text_chunk_size`."""
        tokens = self.tokenizer(prompts).to(self.device)
        return self.towers.encode_in_chunks(
            lambda tok, _: self.towers.encode_text(tok), tokens, self.towers.eot_index(tokens),
            self.hparams.text_chunk_size,
        )

    def encode_label_space(self, space: LabelSpace) -> Tensor:
        """(C, D) normalized class features: the mean of each class's normalized template features."""
        features = normalize(self.encode_prompts(space.prompts()))
        features = features.view(space.num_classes, len(space.templates), -1).mean(dim=1)
        return normalize(features)

    def training_loss(self, logits: Tensor, labels: Tensor, text_features: Tensor) -> Tensor:
        """Cross-entropy over the current label space; methods add their regularisers here."""
        return F.cross_entropy(logits, labels)

    def supports_label_space(self, space: LabelSpace) -> bool:
        return True

    def train_batch_sampler_factory(self) -> Callable[[Any], Sampler] | None:
        """A function dataset -> batch sampler when the method needs special batches (else shuffled)."""
        return None

    # ------------------------------------------------------------ shared pieces
    def attach_label_spaces(self, train: LabelSpace | None, test: list[LabelSpace]) -> None:
        """Tell the model which classes it trains and tests on (from the datamodule)."""
        self.train_label_space = train
        self.test_label_spaces = list(test)
        self._text_cache.clear()
        if train is not None:
            self.train_acc = MulticlassAccuracy(num_classes=train.num_classes, average="micro")
            self.val_acc = MulticlassAccuracy(num_classes=train.num_classes, average="micro")
        self.test_accs = nn.ModuleList(
            MulticlassAccuracy(num_classes=space.num_classes, average="micro") for space in self.test_label_spaces
        )
        self.on_label_spaces_attached()

    def on_label_spaces_attached(self) -> None:
        """Hook for methods whose modules depend on the training classes."""

    def class_text_features(self, space: LabelSpace) -> Tensor:
        """Re-encoded with gradients while the text side trains; otherwise computed once and cached."""
        if self.training and self.text_features_need_grad():
            return self.encode_label_space(space)
        if space.name not in self._text_cache:
            with torch.no_grad():
                self._text_cache[space.name] = self.encode_label_space(space)
        return self._text_cache[space.name]

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        return self.clip.logit_scale.exp() * normalize(image_features) @ text_features.t()

    def forward(self, images: Tensor, space: LabelSpace) -> Tensor:
        return self.logits(self.encode_images(images), self.class_text_features(space))

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.retrieval = isinstance(datamodule, CaptionRetrievalDataModule)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.retrieval:
            return self.retrieval_training_step(batch)
        images, labels = batch
        text_features = self.class_text_features(self.train_label_space)
        logits = self.logits(self.encode_images(images), text_features)
        loss = self.training_loss(logits, labels, text_features)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def retrieval_training_step(self, batch: tuple[Tensor, Tensor, Tensor, list[str]]) -> Tensor:
        """Symmetric InfoNCE over (image, caption) pairs."""
        image_index, images, caption_index, captions = batch
        image_features = self.encode_images(images, image_index)
        text_features = normalize(self.encode_prompts(list(captions), caption_index))
        loss = contrastive_loss(self.logits(image_features, text_features), image_index)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(image_index))
        return loss

    def on_train_epoch_start(self) -> None:
        optimizer = self.optimizers(use_pl_optimizer=False) if self.trainer.optimizers else None
        # logged here rather than by LearningRateMonitor, which needs a logger; a method without an
        # optimizer (linear probe) gets Lightning's mock optimizer, which has no param_groups
        if optimizer is not None and optimizer.param_groups:
            self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=False, on_epoch=True)

    def _refresh_text_cache(self) -> None:
        if self.text_features_need_grad():
            self._text_cache.clear()

    def on_validation_epoch_start(self) -> None:
        self._refresh_text_cache()

    def on_test_epoch_start(self) -> None:
        self._refresh_text_cache()
        self._retrieval_outputs = {"images": [], "captions": []}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.val_acc(self(images, self.train_label_space), labels)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.retrieval:  # loader 0: images, loader 1: captions; recalls at the end of the epoch
            if dataloader_idx == 0:
                image_index, images = batch
                self._retrieval_outputs["images"].append((image_index, normalize(self.encode_images(images))))
            else:
                caption_index, caption_image, captions = batch
                features = normalize(self.encode_prompts(list(captions)))
                self._retrieval_outputs["captions"].append((caption_index, caption_image, features))
            return
        space = self.test_label_spaces[dataloader_idx]
        if not self.supports_label_space(space):
            return
        images, labels = batch
        metric = self.test_accs[dataloader_idx]
        metric(self(images, space), labels)
        self.log(f"test/{space.name}/acc", metric, on_epoch=True, add_dataloader_idx=False, batch_size=len(labels))

    def _gathered(self, name: str) -> list[Tensor]:
        tensors = [torch.cat(parts) for parts in zip(*self._retrieval_outputs[name], strict=True)]
        if self.trainer.world_size > 1:
            tensors = [self.all_gather(t).flatten(0, 1) for t in tensors]
        return tensors

    def on_test_epoch_end(self) -> None:
        if not self.retrieval:
            return
        recalls = recalls_from_features(*self._gathered("images"), *self._gathered("captions"))
        for key, value in recalls.items():
            self.log(f"test/{key}", value, add_dataloader_idx=False)
        self.log("test/rsum", round(recall_sum_percent(recalls), 4), add_dataloader_idx=False)
        self._retrieval_outputs = {"images": [], "captions": []}

    # ------------------------------------------------------------ optimisation
    def trainable_parameter_names(self) -> list[str]:
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError(f"{self.method_name} has no trainable parameters; it evaluates without training.")
        groups = build_param_groups(named, self.hparams.get("param_groups"), self.hparams.get("no_decay_names"))
        optimizer = hydra.utils.instantiate(self.hparams.optimizer, _partial_=True)(groups)
        interval = self.hparams.scheduler_interval
        total = self.trainer.max_epochs if interval == "epoch" else self.trainer.estimated_stepping_batches
        scheduler = build_scheduler(optimizer, self.hparams.scheduler, int(total))
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    # ------------------------------------------------------------ checkpoints
    def checkpoint_state_names(self) -> set[str]:
        """State-dict keys a checkpoint keeps: the trainable parameters (methods may add buffers)."""
        return set(self.trainable_parameter_names())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.checkpoint_state_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[CHECKPOINT_KEY] = {
            "method": self.method_name,
            "method_class": f"{type(self).__module__}.{type(self).__qualname__}",
            "backbone": self.backbone_identity,
            "state_names": sorted(keep),
            "train_label_space": asdict(self.train_label_space) if self.train_label_space else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(CHECKPOINT_KEY)
        if meta is None:
            raise ConfigError("This checkpoint was not written by vlm_adapt (no 'vlm_adapt' entry).")
        own_class = f"{type(self).__module__}.{type(self).__qualname__}"
        if meta.get("method_class") != own_class:
            # another method's tensors would load as nothing (strict=False) or fail in the optimizer state
            raise ConfigError(
                f"This checkpoint was written by method={meta.get('method')} ({meta.get('method_class')}), but this "
                f"run is method={self.method_name} ({own_class}). Pass a checkpoint of method={self.method_name}, "
                f"or run method={meta.get('method')} to continue that one."
            )
        if meta["backbone"] != self.backbone_identity:
            raise BackboneMismatchError(
                f"Checkpoint was trained on backbone {meta['backbone']} but the current backbone is "
                f"{self.backbone_identity}. Load it with the same backbone (backbone=... "
                "backbone.pretrained=...), or leave the backbone unset in `vlm-adapt eval` to use the checkpoint's."
            )
        missing = (set(meta["state_names"]) | self.checkpoint_state_names()) - set(checkpoint["state_dict"])
        if missing:
            raise ConfigError(
                f"This checkpoint of method={meta.get('method')} lacks {len(missing)} tensor(s) that "
                f"method={self.method_name} trains here ({', '.join(sorted(missing)[:5])}); it was written with "
                "other method options. Pass the options it was trained with, or another checkpoint."
            )
