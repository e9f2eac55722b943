"""Image-text retrieval data: COCO-format caption files and the retrieval datamodule.

Layout (`conf/data/coco_captions.yaml`): a root holding `annotations/captions_<split>2017.json`
(COCO's `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`) and one
image folder per split. Training iterates over captions (image, caption) pairs; testing encodes
every image and every caption of the test split once and ranks them (R@1/5/10 both ways).
Every sample carries its index, so methods can cache per-image and per-caption features.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from vlm_adapt.data.checks import check_loader_args, check_root
from vlm_adapt.data.datasets import load_image
from vlm_adapt.data.transforms import train_transform
from vlm_adapt.errors import ConfigError, DatasetNotFoundError
from vlm_adapt.methods.registry import RETRIEVAL

CAPTIONS_LAYOUT = "coco_captions"
LAYOUT_HELP = (
    "a root with annotations/captions_<split>2017.json in COCO caption format "
    '({"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}) '
    "and an image folder per split (train2017/, val2017/)"
)


@dataclass
class CaptionSplit:
    """The images of one split and their captions; `caption_image[c]` is the image index of caption c."""

    name: str
    image_dir: Path
    images: list[str]
    captions: list[str]
    caption_image: list[int]


def read_coco_captions(dataset: dict[str, Any], split: str) -> CaptionSplit:
    """Read split `split` of a COCO-format caption dataset config (images sorted by id)."""
    root = check_root(dataset)
    splits = dataset.get("splits") or {}
    if split not in splits:
        raise ConfigError(f"data.splits has no split {split!r} (it has {sorted(splits)}); set protocol.*_split.")
    annotation_path = root / splits[split]["annotations"]
    image_dir = root / splits[split]["images"]
    if not annotation_path.is_file() or not image_dir.is_dir():
        raise DatasetNotFoundError(
            f"Dataset {dataset['name']!r}: {annotation_path} or {image_dir} is missing. Set data.root=/path/to/coco "
            f"(or VLM_ADAPT_DATA_DIR); expected layout: {LAYOUT_HELP}."
        )
    try:
        content = json.loads(annotation_path.read_text())
        images = sorted(content["images"], key=lambda image: image["id"])
        row_of_id = {image["id"]: row for row, image in enumerate(images)}
        annotations = sorted(content["annotations"], key=lambda a: (row_of_id[a["image_id"]], a.get("id", 0)))
        captions = [a["caption"].strip() for a in annotations]
        caption_image = [row_of_id[a["image_id"]] for a in annotations]
        files = [image["file_name"] for image in images]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DatasetNotFoundError(
            f"{annotation_path} is not a COCO caption file ({err!r}); expected {LAYOUT_HELP}."
        ) from err
    uncaptioned = set(range(len(files))) - set(caption_image)
    if uncaptioned:
        raise DatasetNotFoundError(
            f"{annotation_path}: {len(uncaptioned)} images have no caption (e.g. {files[min(uncaptioned)]}); "
            "remove them from 'images' so every image can be retrieved."
        )
    return CaptionSplit(f"{dataset['name']}/{split}", image_dir, files, captions, caption_image)


def is_retrieval(protocol: dict[str, Any], dataset: dict[str, Any]) -> bool:
    """Whether a run is image-text retrieval; a caption dataset with a classification protocol is an error."""
    retrieval = protocol.get("task", "classification") == "retrieval"
    captions = dataset.get("layout") == CAPTIONS_LAYOUT
    if retrieval and not captions:
        raise ConfigError(
            f"protocol={protocol.get('name')} ranks captions, but data={dataset.get('name')} is a classification "
            "dataset. Use a caption dataset (data=coco_captions)."
        )
    if captions and not retrieval:
        raise ConfigError(
            f"data={dataset.get('name')} holds captions, not classes: use protocol=retrieval with it."
        )
    return retrieval


class CaptionPairs(Dataset):
    """Training pairs, one per caption: (image index, image, caption index, caption)."""

    def __init__(self, split: CaptionSplit, transform):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.captions)

    def __getitem__(self, index: int):
        image_index = self.split.caption_image[index]
        image = load_image(self.split.image_dir / self.split.images[image_index])
        return image_index, self.transform(image), index, self.split.captions[index]


class SplitImages(Dataset):
    """Every image of a split once: (image index, image)."""

    def __init__(self, split: CaptionSplit, transform):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.images)

    def __getitem__(self, index: int):
        return index, self.transform(load_image(self.split.image_dir / self.split.images[index]))


class SplitCaptions(Dataset):
    """Every caption of a split once: (caption index, its image index, caption)."""

    def __init__(self, split: CaptionSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.captions)

    def __getitem__(self, index: int):
        return index, self.split.caption_image[index], self.split.captions[index]


class CaptionRetrievalDataModule(L.LightningDataModule):
    """Train on (image, caption) pairs of `protocol.train_split`; test retrieval on `protocol.test_split`.

    The test loaders are [images, captions] (dataloader 0 and 1). A retrieval run has no label
    spaces (`train_label_space` is None, `test_label_spaces` empty).
    """

    task = RETRIEVAL  # the task methods run for this data (vlm_adapt/methods/tasks.py)

    def __init__(
        self,
        dataset: dict[str, Any],
        protocol: dict[str, Any],
        batch_size: int,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        augment: str = "none",
    ):
        super().__init__()
        check_loader_args(batch_size, eval_batch_size, num_workers)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.train_split = read_coco_captions(dataset, protocol.get("train_split", "train"))
        self.test_split = read_coco_captions(dataset, protocol.get("test_split", "val"))
        self.train_transform_fn = None
        self.eval_transform_fn = None

    @property
    def train_label_space(self) -> None:
        return None

    @property
    def test_label_spaces(self) -> list:
        return []

    def set_preprocessing(self, preprocess_cfg: dict[str, Any]) -> None:
        """Transforms from the backbone's preprocessing config; evaluation is the un-augmented transform."""
        size = preprocess_cfg["size"]
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean, std = tuple(preprocess_cfg["mean"]), tuple(preprocess_cfg["std"])
        self.train_transform_fn = train_transform(size, mean, std, self.augment)
        self.eval_transform_fn = train_transform(size, mean, std, "none")

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        if self.eval_transform_fn is None:
            raise RuntimeError("call set_preprocessing(backbone.model.visual.preprocess_cfg) before using the loaders")
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(CaptionPairs(self.train_split, self.train_transform_fn), self.batch_size, shuffle=True)

    def val_dataloader(self) -> list:
        return []

    def test_dataloader(self) -> list[DataLoader]:
        return [
            self._loader(SplitImages(self.test_split, self.eval_transform_fn), self.eval_batch_size, shuffle=False),
            self._loader(SplitCaptions(self.test_split), self.eval_batch_size, shuffle=False),
        ]
