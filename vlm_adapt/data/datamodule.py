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
from vlm_adapt.data.coop_few_shot import coop_few_shot_path, read_coop_few_shot
from vlm_adapt.data.datasets import ImageListDataset
from vlm_adapt.data.few_shot import load_or_sample_few_shot
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.data.splits import DatasetSplits, Item, read_coop_split, read_image_folder
from vlm_adapt.data.templates import templates_for
from vlm_adapt.data.transforms import train_transform
from vlm_adapt.errors import ConfigError, DatasetNotFoundError

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
        drop_last: bool = False,
        prompt_templates: str | None = "dataset",
    ):
        """`drop_last`: drop the last partial training batch, as Dassl does (only when the training set
        holds at least one full batch; special batch samplers drop each class's partial batch).
        `prompt_templates`: `dataset` (each data config's templates) or a reference's template set
        (`vlm_adapt/data/templates.py`), applied to the dataset and every target."""
        super().__init__()
        self.drop_last = drop_last
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
        self.target_templates = {
            name: templates_for({**cfg, "name": name}, prompt_templates) for name, cfg in (targets or {}).items()
        }
        self.templates = templates_for(dataset, prompt_templates)

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
        self.few_shot_source = "sampled" if protocol.get("shots") else "all"
        coop_sample = self._coop_few_shot(protocol.get("shots"))
        if coop_sample is not None:
            self.train_items = select_classes(coop_sample["train"], self.train_labels)
        else:
            self.train_items = self._few_shot(self.splits.train, protocol.get("shots"), "train")
        val_shots = min(protocol["shots"], VAL_SHOTS_MAX) if protocol.get("shots") else None
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
        return read_coop_few_shot(path, self.splits.train + self.splits.val)

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
        return ImageListDataset(self.train_items, self.splits.image_dir, transform or self.train_transform_fn)

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        if self.train_dataset_wrapper is not None:
            dataset = self.train_dataset_wrapper(dataset)
        # Dassl's rule: drop the partial batch only when there is a full one
        drop_last = self.drop_last and len(dataset) >= self.batch_size
        factory = self.train_batch_sampler_factory
        sampler = factory(dataset, drop_last=drop_last) if factory else None
        return self._loader(dataset, self.batch_size, shuffle=True, batch_sampler=sampler, drop_last=drop_last)

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
