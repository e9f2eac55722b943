"""The classification datamodule: one dataset, a protocol (shots, base/new subsets, target datasets).

Everything the protocol decides lives here: which training images (few-shot sample, base classes),
which label space training uses, and which test sets (each with its own label space) the run
reports. The model reads `train_label_space` and `test_label_spaces`; it never reads split files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms as T

from vlm_adapt.data.base_new import select_classes, subset_labels
from vlm_adapt.data.datasets import ImageListDataset
from vlm_adapt.data.few_shot import load_or_sample_few_shot
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.data.splits import DatasetSplits, Item, read_coop_split, read_image_folder
from vlm_adapt.data.transforms import train_transform
from vlm_adapt.errors import ConfigError

VAL_SHOTS_MAX = 4  # CoOp validates on min(shots, 4) images per class


def read_dataset(cfg: dict[str, Any]) -> DatasetSplits:
    """Read a dataset config (`conf/data/*.yaml`): layout `coop` or `image_folder`."""
    layout = cfg.get("layout", "coop")
    if layout == "coop":
        return read_coop_split(cfg["name"], cfg["root"], cfg["split_file"], cfg.get("image_dir", "images"))
    if layout == "image_folder":
        return read_image_folder(
            cfg["name"], cfg["root"], cfg.get("classnames_file", "classnames.txt"), cfg.get("image_dir", "images"),
            split_dirs=cfg.get("split_dirs"), folder_by_index=cfg.get("folder_by_index", False),
            present_classes_only=cfg.get("present_classes_only", False),
        )
    raise ConfigError(f"data.layout must be 'coop' or 'image_folder', got {layout!r}")


def templates_of(cfg: dict[str, Any]) -> tuple[str, ...]:
    templates = cfg.get("templates") or ["a photo of a {}."]
    return tuple(templates)


class ClassificationDataModule(L.LightningDataModule):
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
    ):
        super().__init__()
        self.dataset_cfg = dataset
        self.protocol = protocol
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.train_batch_sampler_factory = None  # methods may set a batch sampler (Skip Tuning)
        # methods may wrap the training set (Skip Tuning serves indices into its per-epoch feature cache)
        self.train_dataset_wrapper = None

        self.splits = read_dataset(dataset)
        self.targets = {name: read_dataset({**cfg, "name": name}) for name, cfg in (targets or {}).items()}
        self.target_templates = {name: templates_of(cfg) for name, cfg in (targets or {}).items()}
        self.templates = templates_of(dataset)

        train_subset = protocol.get("train_subset", "all")
        self.train_labels = subset_labels(len(self.splits.classnames), train_subset)
        self.train_label_space = self._label_space("train", self.splits.classnames, self.train_labels)
        self.test_sets: list[tuple[LabelSpace, list[Item], Path]] = []
        for subset in protocol.get("test_subsets", ["all"]):
            labels = subset_labels(len(self.splits.classnames), subset)
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
        self.train_items = self._few_shot(self.splits.train, protocol.get("shots"), "train")
        val_shots = min(protocol["shots"], VAL_SHOTS_MAX) if protocol.get("shots") else None
        self.val_items = self._few_shot(self.splits.val, val_shots, "val")
        self.train_transform_fn = None
        self.eval_transform_fn = None

    @property
    def test_label_spaces(self) -> list[LabelSpace]:
        return [space for space, _, _ in self.test_sets]

    def _label_space(self, name: str, classnames: list[str], labels: list[int]) -> LabelSpace:
        return LabelSpace(name, tuple(classnames[i] for i in labels), self.templates)

    def _few_shot(self, items: list[Item], shots: int | None, split: str) -> list[Item]:
        items = select_classes(items, self.train_labels)
        if not shots:
            return items
        cache = None
        if self.cache_dir is not None:
            subset = self.protocol.get("train_subset", "all")
            name = f"{split}_{subset}_shots{shots}_seed{self.seed}.json"
            cache = self.cache_dir / "few_shot" / self.splits.name / name
        return load_or_sample_few_shot(items, shots, self.seed, cache)

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

    def _loader(self, dataset, batch_size: int, shuffle: bool, batch_sampler: Sampler | None = None) -> DataLoader:
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
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **common)

    def train_dataset(self, transform=None) -> ImageListDataset:
        self._check_ready()
        return ImageListDataset(self.train_items, self.splits.image_dir, transform or self.train_transform_fn)

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        if self.train_dataset_wrapper is not None:
            dataset = self.train_dataset_wrapper(dataset)
        sampler = self.train_batch_sampler_factory(dataset) if self.train_batch_sampler_factory else None
        return self._loader(dataset, self.batch_size, shuffle=True, batch_sampler=sampler)

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
