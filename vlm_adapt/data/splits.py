"""Reading dataset splits: CoOp's `split_zhou_<Name>.json` layout and plain image folders."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from vlm_adapt.errors import DatasetNotFoundError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Item:
    """One labelled image: path relative to the dataset's image directory."""

    path: str
    label: int
    classname: str


@dataclass
class DatasetSplits:
    """train / val / test items and the class names indexed by label."""

    name: str
    image_dir: Path
    train: list[Item]
    val: list[Item]
    test: list[Item]
    classnames: list[str]


COOP_LAYOUT = (
    "a folder with the images (image_dir, default 'images') and a CoOp split file "
    '{"train"|"val"|"test": [[relative_path, label, classname], ...]}'
)


def _classnames_from_items(items: list[Item], source: Path) -> list[str]:
    names: dict[int, str] = {}
    for item in items:
        names.setdefault(item.label, item.classname)
    labels = sorted(names)
    if labels != list(range(len(labels))):
        raise DatasetNotFoundError(f"{source}: labels must be 0..C-1 without gaps, found {labels[:10]}...")
    return [names[label] for label in labels]


def read_coop_split(name: str, root: str | Path, split_file: str, image_dir: str = "images") -> DatasetSplits:
    """Read a CoOp-layout dataset; a missing root or split file names the expected layout."""
    root = Path(root).expanduser()
    split_path = root / split_file
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"Dataset {name!r}: root {root} does not exist. Set data.root=/path/to/{name} "
            f"(or VLM_ADAPT_DATA_DIR for all datasets); expected layout: {COOP_LAYOUT}."
        )
    if not split_path.is_file():
        raise DatasetNotFoundError(
            f"Dataset {name!r}: split file {split_path} not found. Expected layout under {root}: {COOP_LAYOUT}."
        )
    try:
        raw = json.loads(split_path.read_text())
        splits = {
            split: [Item(str(p), int(label), str(cls).replace("_", " ")) for p, label, cls in raw[split]]
            for split in SPLITS
        }
    except (KeyError, ValueError, TypeError) as err:
        raise DatasetNotFoundError(
            f"Dataset {name!r}: {split_path} is not a CoOp split file ({err}). Expected {COOP_LAYOUT}."
        ) from err
    classnames = _classnames_from_items(splits["train"] + splits["val"] + splits["test"], split_path)
    return DatasetSplits(name, root / image_dir, splits["train"], splits["val"], splits["test"], classnames)


def read_classnames_file(path: Path) -> list[tuple[str, str]]:
    """Lines of `<folder> <class name>`; the line order gives the label."""
    if not path.is_file():
        raise DatasetNotFoundError(f"class-names file {path} not found; it holds '<folder> <class name>' lines.")
    entries = []
    for line in path.read_text().splitlines():
        if line.strip():
            folder, _, classname = line.strip().partition(" ")
            entries.append((folder, classname.strip() or folder))
    return entries


def read_image_folder(
    name: str,
    root: str | Path,
    classnames_file: str = "classnames.txt",
    image_dir: str = "images",
    split_dirs: dict[str, str | None] | None = None,
    split_ratios: tuple[float, float, float] = (0.5, 0.2, 0.3),
    split_seed: int = 0,
    folder_by_index: bool = False,
    present_classes_only: bool = False,
) -> DatasetSplits:
    """An image folder `<image_dir>/<folder>/*.jpg` with a class-names file.

    `split_dirs` maps train/val/test to sub-folders of `image_dir` (ImageNet: {train: train,
    test: val}); without it each class is split by `split_ratios` (CoOp's 50/20/30) with a fixed seed.
    `folder_by_index`: class folders are named by their line index 0..C-1 (ImageNet-V2's release).
    `present_classes_only`: keep only the classes whose folder exists, relabelled 0..K-1 in file
    order (ImageNet-A and -R hold 200 of the 1000 wnids of ImageNet's class-names file).
    """
    root = Path(root).expanduser()
    images = root / image_dir
    if not images.is_dir():
        raise DatasetNotFoundError(
            f"Dataset {name!r}: {images} does not exist. Expected {root}/{classnames_file} and "
            f"{root}/{image_dir}/<folder>/*.jpg (optionally {image_dir}/{{train,val,test}}/<folder>/)."
        )
    entries = read_classnames_file(root / classnames_file)
    if folder_by_index:
        entries = [(str(index), classname) for index, (_, classname) in enumerate(entries)]
    if present_classes_only:
        bases = [images / sub for sub in (split_dirs or {}).values() if sub] or [images]
        entries = [entry for entry in entries if any((base / entry[0]).is_dir() for base in bases)]
        if not entries:
            raise DatasetNotFoundError(
                f"Dataset {name!r}: no class of {root / classnames_file} has a folder under {images}."
            )

    def items_in(base: Path, prefix: str) -> dict[int, list[Item]]:
        found: dict[int, list[Item]] = {}
        for label, (folder, classname) in enumerate(entries):
            files = sorted(p for p in (base / folder).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            found[label] = [Item(f"{prefix}{folder}/{p.name}", label, classname) for p in files]
        return found

    classnames = [classname for _, classname in entries]
    if split_dirs:
        flat: dict[str, list[Item]] = {}
        for split in SPLITS:
            sub = split_dirs.get(split)
            if sub and not (images / sub).is_dir():
                raise DatasetNotFoundError(f"Dataset {name!r}: split folder {images / sub} does not exist.")
            found = items_in(images / sub, f"{sub}/") if sub else {}
            flat[split] = [item for items in found.values() for item in items]
        return DatasetSplits(name, images, flat["train"], flat["val"], flat["test"], classnames)

    rng = random.Random(split_seed)
    train, val, test = [], [], []
    for items in items_in(images, "").values():
        items = items[:]
        rng.shuffle(items)
        n_train = round(len(items) * split_ratios[0])
        n_val = round(len(items) * split_ratios[1])
        train += items[:n_train]
        val += items[n_train : n_train + n_val]
        test += items[n_train + n_val :]
    return DatasetSplits(name, images, train, val, test, classnames)
