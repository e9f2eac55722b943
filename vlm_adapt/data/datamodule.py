"""The classification datamodule: one dataset, a protocol (shots, base/new subsets, target datasets).

Everything the protocol decides lives here: which training images (few-shot sample, base classes),
which label space training uses, and which test sets (each with its own label space) the run
reports. The model reads `train_label_space` and `test_label_spaces`; it never reads split files.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms as T

from vlm_adapt.data.base_new import SUBSETS, select_classes, subset_labels
from vlm_adapt.data.checks import EXAMPLES, check_loader_args, check_root, check_shots
from vlm_adapt.data.coop_few_shot import coop_few_shot_path, read_coop_few_shot
from vlm_adapt.data.datasets import ImageListDataset
from vlm_adapt.data.few_shot import load_or_sample_few_shot
from vlm_adapt.data.inputs import TrainingInputs, training_set
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.data.loaders import EpochSeededLoader
from vlm_adapt.data.splits import DatasetSplits, Item, read_coop_split, read_image_folder
from vlm_adapt.data.templates import templates_for
from vlm_adapt.data.transforms import train_transform
from vlm_adapt.errors import ConfigError, DatasetNotFoundError
from vlm_adapt.methods.registry import CLASSIFICATION

log = logging.getLogger(__name__)

VAL_SHOTS_MAX = 4  # CoOp validates on min(shots, 4) images per class


def read_dataset(cfg: dict[str, Any], key: str = "data") -> DatasetSplits:
    """Read a dataset config (`conf/data/*.yaml`): layout `coop` or `image_folder`. `key` is where the
    config sits (`data`, `protocol.targets.<name>`), for messages; the root must be set and exist."""
    layout = cfg.get("layout", "coop")
    if layout in ("coop", "image_folder"):
        check_root(cfg, key)
    if layout == "coop":
        return read_coop_split(cfg["name"], cfg["root"], cfg["split_file"], cfg.get("image_dir", "images"),
                               train_all_classes=cfg.get("train_all_classes", True))
    if layout == "image_folder":
        return read_image_folder(
            cfg["name"], cfg["root"], cfg.get("classnames_file", "classnames.txt"), cfg.get("image_dir", "images"),
            split_dirs=cfg.get("split_dirs"), folder_by_index=cfg.get("folder_by_index", False),
            present_classes_only=cfg.get("present_classes_only", False),
        )
    raise ConfigError(f"data.layout must be 'coop' or 'image_folder', got {layout!r}")


class ClassificationDataModule(L.LightningDataModule):
    task = CLASSIFICATION  # the task methods run for this data (vlm_adapt/methods/tasks.py)

    def __init__(
        self,
        dataset: dict[str, Any],
        protocol: dict[str, Any],
        seed: int,
        batch_size: int,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        augment: str = "coop",
        cache_dir: str | None = None,
        targets: dict[str, dict[str, Any]] | None = None,
        drop_last: bool = False,
        prompt_templates: str | None = "dataset",
    ):
        """`drop_last`: drop the last partial training batch, as Dassl does (only when the training set
        holds at least one full batch; special batch samplers drop each class's partial batch).
        `prompt_templates`: `dataset` (each data config's templates) or a reference's template set
        (`vlm_adapt/data/templates.py`), applied to the dataset and every target."""
        super().__init__()
        check_loader_args(batch_size, eval_batch_size, num_workers)
        shots = check_shots(protocol.get("shots"))
        self.drop_last = drop_last
        self.dataset_cfg = dataset
        self.protocol = protocol
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.cache_dir = Path(cache_dir) if cache_dir else None

        self.splits = read_dataset(dataset)
        targets = targets or {}
        self.targets = {name: read_dataset({**cfg, "name": name}, f"protocol.targets.{name}")
                        for name, cfg in targets.items()}
        self.target_templates = {
            name: templates_for({**cfg, "name": name}, prompt_templates) for name, cfg in targets.items()
        }
        self.templates = templates_for(dataset, prompt_templates)

        train_subset = protocol.get("train_subset", "all")
        self.train_labels = self._subset_labels("protocol.train_subset", train_subset)
        self.train_label_space = self._label_space("train", self.splits.classnames, self.train_labels)
        self.test_sets: list[tuple[LabelSpace, list[Item], Path]] = []
        for subset in protocol.get("test_subsets", ["all"]):
            labels = self._subset_labels("protocol.test_subsets", subset)
            name = dataset["name"] if subset == "all" else subset
            space = self._label_space(name, self.splits.classnames, labels)
            self.test_sets.append((space, select_classes(self.splits.test, labels), self.splits.image_dir))
        for name, splits in self.targets.items():
            space = LabelSpace(name, tuple(splits.classnames), self.target_templates[name])
            self.test_sets.append((space, splits.test, splits.image_dir))
        names = [space.name for space in self.test_label_spaces]
        if len(set(names)) < len(names):  # each test set reports test/<name>/acc: names must be unique
            raise ConfigError(
                f"Test sets {sorted({n for n in names if names.count(n) > 1})} appear twice (a target with the "
                "training dataset's name?); drop the target with '~data@protocol.targets.<name>'."
            )
        self._check_test_sets()
        self.few_shot_source = "sampled" if shots else "all"
        coop_sample = self._coop_few_shot(shots)
        if coop_sample is not None:
            self.train_items = select_classes(coop_sample["train"], self.train_labels)
        else:
            self.train_items = self._few_shot(self.splits.train, shots, "train")
        self.few_shot_record = self._few_shot_record(shots)
        val_shots = min(shots, VAL_SHOTS_MAX) if shots else None
        if coop_sample is not None and "val" in coop_sample:
            self.val_items = select_classes(coop_sample["val"], self.train_labels)
        else:
            self.val_items = self._few_shot(self.splits.val, val_shots, "val")
        self.train_transform_fn = None
        self.eval_transform_fn = None

    @property
    def test_label_spaces(self) -> list[LabelSpace]:
        return [space for space, _, _ in self.test_sets]

    def _label_space(self, name: str, classnames: list[str], labels: list[int]) -> LabelSpace:
        return LabelSpace(name, tuple(classnames[i] for i in labels), self.templates)

    def _subset_labels(self, key: str, subset: Any) -> list[int]:
        """The labels of a base/new subset; a subset that is unknown or selects no class names `key`."""
        classes = len(self.splits.classnames)
        if subset not in SUBSETS:
            raise ConfigError(f"{key}: {subset!r} is not a class subset; use one of {', '.join(SUBSETS)}.")
        labels = subset_labels(classes, subset)
        if not labels:
            n_base = len(subset_labels(classes, "base"))
            raise ConfigError(
                f"{key}: {subset!r} selects no class of data={self.splits.name} ({classes} classes: base is the "
                f"first {n_base}, new the rest). Use 'all', or a dataset with more classes."
            )
        return labels

    def _check_test_sets(self) -> None:
        """Every test set must hold images: an empty one would report no accuracy, or a made-up one."""
        empty = [space.name for space, items, _ in self.test_sets if not items]
        if empty:
            raise DatasetNotFoundError(
                f"Test sets {empty} of this run have no images: give data={self.splits.name} (or the target) a "
                "test split with those classes, or leave the set out (protocol.test_subsets, "
                "'~data@protocol.targets.<name>')."
            )

    def _few_shot_record(self, shots: int | None) -> dict[str, Any]:
        """What training uses, per class (JSON): `requested` shots and the images each class really has."""
        counts = Counter(item.label for item in self.train_items)
        per_class = [counts.get(label, 0) for label in range(len(self.train_labels))]
        short = [label for label, count in enumerate(per_class) if shots and count < shots]
        record = {
            "source": self.few_shot_source, "requested": shots, "classes": len(per_class),
            "images": len(self.train_items), "per_class_min": min(per_class, default=0),
            "per_class_max": max(per_class, default=0), "classes_short": len(short),
        }
        if short and self.train_items:  # a test-only dataset (no training images) is refused when training
            names = self.train_label_space.classnames
            examples = ", ".join(f"{names[label]!r} ({per_class[label]})" for label in short[:EXAMPLES])
            log.warning(
                "protocol.shots=%d: %d of %d training classes have fewer images (few-shot source: %s) and train on "
                "what there is: %s%s. metrics.json records it under few_shot (per_class_min=%d).",
                shots, len(short), len(per_class), self.few_shot_source, examples,
                ", ..." if len(short) > EXAMPLES else "", record["per_class_min"],
            )
        return record

    def _coop_few_shot(self, shots: int | None) -> dict[str, list[Item]] | None:
        """CoOp's own sample: `data.few_shot_file`, else `<root>/split_fewshot/shot_K-seed_S.pkl` if present."""
        if not shots:
            return None
        explicit = self.dataset_cfg.get("few_shot_file")
        root = self.dataset_cfg["root"]
        path = Path(explicit).expanduser() if explicit else coop_few_shot_path(root, shots, self.seed)
        if not path.is_file():
            if explicit:
                raise DatasetNotFoundError(
                    f"data.few_shot_file={explicit} does not exist; give CoOp's split_fewshot/shot_K-seed_S.pkl "
                    "or null (vlm_adapt then draws and saves its own sample)."
                )
            return None
        self.few_shot_source = str(path)
        return read_coop_few_shot(path, self.splits.train + self.splits.val, explicit=bool(explicit))

    def _few_shot(self, items: list[Item], shots: int | None, split: str) -> list[Item]:
        items = select_classes(items, self.train_labels)
        if not shots:
            return items
        cache = self.cache_dir / "few_shot" / self.splits.name if self.cache_dir is not None else None
        subset = self.protocol.get("train_subset", "all")
        return load_or_sample_few_shot(items, shots, self.seed, cache, f"{split}_{subset}_shots{shots}_seed{self.seed}")

    def set_preprocessing(self, preprocess_cfg: dict[str, Any]) -> None:
        """Build transforms from the backbone's open_clip preprocessing config (size, mean, std)."""
        size = preprocess_cfg["size"]
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean, std = tuple(preprocess_cfg["mean"]), tuple(preprocess_cfg["std"])
        self.train_transform_fn = train_transform(size, mean, std, self.augment)
        self.eval_transform_fn = T.Compose([
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ])

    def _check_ready(self) -> None:
        if self.eval_transform_fn is None:
            raise RuntimeError("call set_preprocessing(backbone.model.visual.preprocess_cfg) before using the loaders")

    def _loader(
        self, dataset, batch_size: int, shuffle: bool, batch_sampler: Sampler | None = None, drop_last: bool = False
    ) -> DataLoader:
        common = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0, pin_memory=False)
        if batch_sampler is not None:
            return DataLoader(dataset, batch_sampler=batch_sampler, **common)
        if not shuffle and self.trainer is not None and self.trainer.world_size > 1:
            # evaluation under DDP: disjoint shares, every image counted once (Lightning's DistributedSampler
            # would pad the last share with repeated images and skew the accuracy)
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
            )
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **common)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, **common)

    def train_dataset(self, transform=None) -> ImageListDataset:
        self._check_ready()
        if not self.train_items:  # checked here, not when read: a zero-shot run needs no training images
            raise DatasetNotFoundError(
                f"data={self.splits.name} has no training images (a test-only dataset): train on a dataset with a "
                "train split, or evaluate it without training (method=zero_shot, vlm-adapt eval)."
            )
        return ImageListDataset(self.train_items, self.splits.image_dir, transform or self.train_transform_fn)

    def train_dataloader(self) -> DataLoader:
        inputs = self.method_inputs()
        dataset = training_set(self.train_dataset(), inputs)
        # Dassl's rule: drop the partial batch only when there is a full one
        drop_last = self.drop_last and len(dataset) >= self.batch_size
        sampler = inputs.batch_sampler(dataset, drop_last=drop_last) if inputs.batch_sampler else None
        # the same batches and augmentations in epoch e of every run of a seed, resumed or not
        common = dict(num_workers=self.num_workers, pin_memory=False, seed=self.seed, epoch_fn=self._current_epoch)
        if sampler is not None:
            return EpochSeededLoader(dataset, batch_sampler=sampler, **common)
        return EpochSeededLoader(dataset, batch_size=self.batch_size, shuffle=True, drop_last=drop_last, **common)

    def method_inputs(self) -> TrainingInputs:
        """What the method being fitted asks its training batches to hold (vlm_adapt/data/inputs.py)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        return module.training_inputs() if hasattr(module, "training_inputs") else TrainingInputs()

    def _current_epoch(self) -> int:
        """The epoch the loader's next iterator is for: the epochs processed so far (restored from the
        checkpoint when resuming, before Lightning's `current_epoch` catches up)."""
        return self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0

    def val_dataloader(self) -> DataLoader | list:
        self._check_ready()
        if not self.val_items:
            return []
        dataset = ImageListDataset(self.val_items, self.splits.image_dir, self.eval_transform_fn)
        return self._loader(dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> list[DataLoader]:
        self._check_ready()
        return [
            self._loader(ImageListDataset(items, image_dir, self.eval_transform_fn), self.eval_batch_size, False)
            for _, items, image_dir in self.test_sets
        ]
