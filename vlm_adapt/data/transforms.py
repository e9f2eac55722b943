"""CLIP preprocessing. Evaluation uses open_clip's own transform; training adds CoOp's augmentation."""

from __future__ import annotations

from collections.abc import Callable

from torchvision import transforms as T


def train_transform(image_size: int, mean: tuple[float, ...], std: tuple[float, ...], augment: str) -> Callable:
    """`augment`: "coop" (random resized crop at scale 0.08-1 and horizontal flip, as CoOp and its
    successors train) or "none" (resize and centre crop only, for cached-feature methods)."""
    if augment == "coop":
        spatial = [
            T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
        ]
    elif augment == "none":
        spatial = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    else:
        raise ValueError(f"data.augment must be 'coop' or 'none', got {augment!r}")
    return T.Compose([*spatial, T.ToTensor(), T.Normalize(mean, std)])
