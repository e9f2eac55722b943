"""The shared LightningModule: prompting, logits, loss, metrics, optimizer, checkpoint trimming.

A method subclasses `CLIPMethod`, registers itself (`vlm_adapt/methods/registry.py`) and says which
parameters train (`select_trainable`) and, where it differs from plain CLIP, how images and label
spaces are encoded, what a training batch gives (`classification_forward`) or what the loss adds.
The steps themselves belong to the run's task (`vlm_adapt/methods/tasks.py`), so no method overrides
them. Checkpoints hold only the trainable parameters plus the identity of the backbone they belong to.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, ClassVar

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from vlm_adapt.backbones import Backbone, CLIPTowers
from vlm_adapt.backbones.towers import class_features, normalize
from vlm_adapt.checkpoints import CHECKPOINT_KEY
from vlm_adapt.data.inputs import TrainingInputs
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.data.sample_cache import CacheRequest, SampleCaches
from vlm_adapt.errors import BackboneMismatchError, ConfigError
from vlm_adapt.methods.param_groups import build_param_groups
from vlm_adapt.methods.registry import CLASSIFICATION, RETRIEVAL, MethodSpec
from vlm_adapt.methods.schedulers import build_scheduler
from vlm_adapt.methods.tasks import TASK_CLASSES, ClassificationOutput, ClassificationTask, Task

log = logging.getLogger(__name__)


class CLIPMethod(L.LightningModule):
    """Classification with CLIP: logits = exp(logit_scale) * cos(image, class text features)."""

    # set by @register_method (vlm_adapt/methods/registry.py): the config name and capabilities
    method_name: ClassVar[str]
    spec: ClassVar[MethodSpec]

    @property
    def trains(self) -> bool:
        return self.spec.trains

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
        self.task: Task = ClassificationTask()  # setup() takes the run's task from its datamodule
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
        return class_features(self.encode_prompts(space.prompts()), len(space.templates))

    def training_loss(self, logits: Tensor, labels: Tensor, text_features: Tensor) -> Tensor:
        """Cross-entropy over the current label space; methods add their regularisers here."""
        return F.cross_entropy(logits, labels)

    def supports_label_space(self, space: LabelSpace) -> bool:
        return True

    def training_inputs(self) -> TrainingInputs:
        """What this method's training batches hold (images and labels by default; see data/inputs.py)."""
        return TrainingInputs()

    def cache_requests(self) -> list[CacheRequest]:
        """How the caches this method declares (`@register_method(caches=...)` with a name) are computed."""
        return []

    @property
    def sample_caches(self) -> SampleCaches:
        """The shared cache service of this model (vlm_adapt/data/sample_cache.py), made at first use."""
        if "_sample_caches" not in self.__dict__:
            declared = {spec.name: spec.refresh for spec in self.spec.caches if spec.name}
            self.__dict__["_sample_caches"] = SampleCaches(self.cache_requests(), declared)
        return self.__dict__["_sample_caches"]

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

    def classification_forward(self, batch: Any) -> ClassificationOutput:
        """A classification training batch, `(images, labels)` or `(index, images, labels)`, through the
        method: logits against the training label space. Methods that train against a subset of the
        classes or from cached activations supply their own."""
        index, images, labels = batch if len(batch) == 3 else (None, *batch)
        text_features = self.class_text_features(self.train_label_space)
        logits = self.logits(self.encode_images(images, index), text_features)
        return ClassificationOutput(logits, labels, text_features, labels)

    def observe(self, split: str, images: Tensor, labels: Tensor) -> None:
        """A method fitted in closed form (registered with fit="closed_form") collects its data here."""
        raise NotImplementedError(f"{type(self).__name__} is registered with fit='closed_form' but has no observe()")

    # ------------------------------------------------------------ the loop: each step is the task's
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.task = TASK_CLASSES[getattr(datamodule, "task", CLASSIFICATION)]()
        if stage == "fit" and self.sample_caches:
            self.sample_caches.bind(datamodule, self.trainer, f"method={self.method_name}")

    @property
    def retrieval(self) -> bool:
        return self.task.name == RETRIEVAL

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return self.task.training_step(self, batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.task.validation_step(self, batch)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.task.test_step(self, batch, dataloader_idx)

    def on_train_epoch_start(self) -> None:
        optimizer = self.optimizers(use_pl_optimizer=False) if self.trainer.optimizers else None
        # logged here rather than by LearningRateMonitor, which needs a logger; a method without an
        # optimizer (linear probe) gets Lightning's mock optimizer, which has no param_groups
        if optimizer is not None and optimizer.param_groups:
            self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=False, on_epoch=True)
        for name in self.sample_caches.per_epoch():  # built before the steps, so step times exclude them
            rows = self.sample_caches.get(name, self.device, self.current_epoch)
            self.log(f"train/{name}_cache_s", rows.seconds, on_step=False, on_epoch=True)

    def on_train_end(self) -> None:
        self.sample_caches.release()  # training caches are not needed for evaluation

    def _refresh_text_cache(self) -> None:
        if self.text_features_need_grad():
            self._text_cache.clear()

    def on_validation_epoch_start(self) -> None:
        self._refresh_text_cache()

    def on_test_epoch_start(self) -> None:
        self._refresh_text_cache()
        self.task.on_test_epoch_start(self)

    def on_test_epoch_end(self) -> None:
        self.task.on_test_epoch_end(self)

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
        if interval == "epoch":
            total = self.trainer.max_epochs
        else:
            total = self.trainer.estimated_stepping_batches
            # Lightning built the training loader (and its first epoch's iterator) for that estimate, before a
            # resumed run's loop state is restored: drop it so it is built again for the right epoch
            fit_loop = getattr(self.trainer, "fit_loop", None)
            if fit_loop is not None:
                fit_loop._combined_loader = None
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
