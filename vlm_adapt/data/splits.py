"""Reading dataset splits: CoOp's `split_zhou_<Name>.json` layout and plain image folders."""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from vlm_adapt.data.checks import Problems
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


def _entry(raw: object) -> Item | None:
    """A `[relative_path, label, classname]` entry of a CoOp split file, or None if it is not one."""
    if not (isinstance(raw, (list, tuple)) and len(raw) == 3):
        return None
    path, label, classname = raw
    if not (isinstance(path, str) and isinstance(classname, str) and type(label) is int):  # bool is no label
        return None
    return Item(path, label, classname.replace("_", " "))


def _classnames_by_label(items: list[Item]) -> list[str]:
    """C = the number of distinct class names; name k is the name most entries with label k carry
    ('' when none has label k). `validate_splits` then reports labels outside 0..C-1 and other names."""
    names: dict[int, Counter[str]] = defaultdict(Counter)
    for item in items:
        names[item.label][item.classname] += 1
    count = len({item.classname for item in items})
    return [names[label].most_common(1)[0][0] if names[label] else "" for label in range(count)]


def _missing_files(items: list[Item], image_dir: Path) -> list[str]:
    """Paths of `items` that are not files under `image_dir`: one directory listing per folder, not a stat
    per image (about a hundred listings for Food-101's 101,000 images)."""
    listings: dict[Path, set[str]] = {}
    missing = []
    for item in items:
        file = image_dir / item.path
        if file.parent not in listings:
            try:
                listings[file.parent] = {e.name for e in os.scandir(file.parent) if not e.is_dir()}
            except OSError:
                listings[file.parent] = set()
        if file.name not in listings[file.parent]:
            missing.append(item.path)
    return missing


def validate_splits(
    splits: DatasetSplits, source: str, fix: str, check_files: bool = True, problems: Problems | None = None,
    train_all_classes: bool = True,
) -> None:
    """Raise one DatasetNotFoundError listing every problem of `splits` (read from `source`), with those
    the reader already found (`problems`), then how to `fix` them:

    - a label outside 0..C-1 (C = the number of class names): it would be a phantom class;
    - an entry whose class name is not its label's (one label, two names: only the first would be kept);
    - a class without a training image, when the split has training images (it would silently not train);
    - with `check_files`, image files that do not exist (one directory listing per folder).
    Test-only datasets (no training images at all), and `train_all_classes=False` (a synthetic split that
    trains on some classes and encodes all, as `vlm-adapt bench` writes), are not asked for training images.
    """
    problems = problems if problems is not None else Problems()
    classes = len(splits.classnames)
    if not classes:
        problems.add("no class names at all")
    named = {split: getattr(splits, split) for split in SPLITS}
    for split, items in named.items():
        for index, item in enumerate(items):
            where = f"{split}[{index}] {item.path!r}"
            if not 0 <= item.label < classes:
                other = splits.classnames.index(item.classname) if item.classname in splits.classnames else None
                problems.add(f"labels outside 0..{classes - 1} ({classes} class names)",
                             f"{where} label {item.label} {item.classname!r}"
                             + (f" (the name of label {other})" if other is not None else ""))
            elif item.classname != splits.classnames[item.label]:
                problems.add("entries whose class name differs from their label's",
                             f"{where} label {item.label} is {item.classname!r}, elsewhere "
                             f"{splits.classnames[item.label]!r}")
    if splits.train and train_all_classes:
        trained = {item.label for item in splits.train}
        for label in range(classes):
            if label not in trained:
                name = splits.classnames[label]
                problems.add("classes without a training image",
                             f"{label} {name!r}" if name else f"{label} (no entry has this label)")
    if check_files:
        if not splits.image_dir.is_dir():
            problems.add("image folder missing", f"{splits.image_dir} does not exist (data.image_dir?)")
        else:
            for path in _missing_files([i for items in named.values() for i in items], splits.image_dir):
                problems.add(f"image files missing under {splits.image_dir}", path)
    problems.raise_if_any(f"Dataset {splits.name!r}: {source} has problems:", fix)


def read_coop_split(
    name: str, root: str | Path, split_file: str, image_dir: str = "images", train_all_classes: bool = True
) -> DatasetSplits:
    """Read a CoOp-layout dataset; a missing root or split file names the expected layout.

    Every entry is checked (`validate_splits`), including that its image exists (a directory
    listing per folder, cheap even for 100,000 images); all problems come in one error.
    """
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
        raw_splits = {split: list(raw[split]) for split in SPLITS}
    except (KeyError, ValueError, TypeError) as err:
        raise DatasetNotFoundError(
            f"Dataset {name!r}: {split_path} is not a CoOp split file ({type(err).__name__}: {err}). "
            f"Expected {COOP_LAYOUT}."
        ) from err
    problems = Problems()
    splits: dict[str, list[Item]] = {}
    for split, entries in raw_splits.items():
        splits[split] = []
        for index, entry in enumerate(entries):
            item = _entry(entry)
            if item is None:
                problems.add("entries that are not [relative_path, integer label, classname]",
                             f"{split}[{index}] {json.dumps(entry)[:80]}")
            else:
                splits[split].append(item)
    fix = f"Fix {split_path} (or point data.root / data.split_file at the right one); expected {COOP_LAYOUT}."
    classnames = _classnames_by_label(splits["train"] + splits["val"] + splits["test"])
    result = DatasetSplits(name, root / image_dir, splits["train"], splits["val"], splits["test"], classnames)
    validate_splits(result, str(split_path), fix, problems=problems, train_all_classes=train_all_classes)
    return result


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
    The result is checked by `validate_splits` (every class has a training image when there is a
    training split); image files are not stat'ed, since they come from listing the folders.
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
        result = DatasetSplits(name, images, flat["train"], flat["val"], flat["test"], classnames)
    else:
        result = _split_by_ratios(name, images, items_in(images, ""), classnames, split_ratios, split_seed)
    train_dir = images / split_dirs["train"] if split_dirs and split_dirs.get("train") else None
    where = (f"training images in {train_dir}/<folder>/" if train_dir else
             f"enough images in {images}/<folder>/ for a training share (each class is split {split_ratios} into "
             "train/val/test: a class of one image has none)")
    fix = f"Give every class {where}, or remove the class from {root / classnames_file}."
    validate_splits(result, f"{root / classnames_file} with {images}", fix, check_files=False)
    return result


def _split_by_ratios(
    name: str, images: Path, found: dict[int, list[Item]], classnames: list[str],
    split_ratios: tuple[float, float, float], split_seed: int,
) -> DatasetSplits:
    """Each class's images shuffled with `split_seed` and cut by `split_ratios` into train/val/test."""
    rng = random.Random(split_seed)
    train, val, test = [], [], []
    for items in found.values():
        items = items[:]
        rng.shuffle(items)
        n_train = round(len(items) * split_ratios[0])
        n_val = round(len(items) * split_ratios[1])
        train += items[:n_train]
        val += items[n_train : n_train + n_val]
        test += items[n_train + n_val :]
    return DatasetSplits(name, images, train, val, test, classnames)
