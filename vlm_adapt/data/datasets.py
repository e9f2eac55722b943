"""Torch datasets over item lists. A file that cannot be read is an error naming its path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from vlm_adapt.data.splits import Item
from vlm_adapt.errors import CorruptImageError


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise CorruptImageError(
            f"Cannot read image {path}: {err}. Replace or remove the file and its split entry."
        ) from err


class ImageListDataset(Dataset):
    """(image, label) pairs for a list of items under `image_dir`."""

    def __init__(self, items: list[Item], image_dir: Path, transform: Callable | None):
        self.items = items
        self.image_dir = Path(image_dir)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        image = load_image(self.image_dir / item.path)
        return (self.transform(image) if self.transform else image), item.label
