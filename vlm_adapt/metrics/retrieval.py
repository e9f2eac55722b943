"""Image-text retrieval recall: R@K for image->text and text->image, and their sum (RSUM).

An image query is a hit at K when any of its captions is among the K most similar captions
(COCO has five per image); a caption query is a hit when its one image is among the K most
similar images. Recalls are fractions in [0, 1]; metrics.json stores them in percent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

RECALL_KS = (1, 5, 10)


def retrieval_recalls(similarity: Tensor, caption_image: Tensor, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """`similarity`: (images, captions); `caption_image[c]`: the row of caption c's image.

    Returns {"i2t/r{k}": ..., "t2i/r{k}": ...} as fractions. Every image needs at least one caption,
    otherwise its image->text recall would be undefined.
    """
    num_images, num_captions = similarity.shape
    caption_image = caption_image.to(similarity.device).long()
    if caption_image.shape != (num_captions,):
        raise ValueError(f"caption_image needs one entry per caption ({num_captions}), has {len(caption_image)}")
    captions_per_image = torch.bincount(caption_image, minlength=num_images)
    if len(captions_per_image) > num_images or bool((captions_per_image == 0).any()):
        raise ValueError("every image needs at least one caption and every caption an image row")

    rows = torch.arange(num_images, device=similarity.device)
    caption_order = similarity.argsort(dim=1, descending=True, stable=True)  # (images, captions)
    own_caption = caption_image[caption_order] == rows[:, None]
    i2t_rank = own_caption.int().argmax(dim=1)  # position of the best-ranked own caption

    image_order = similarity.t().argsort(dim=1, descending=True, stable=True)  # (captions, images)
    t2i_rank = (image_order == caption_image[:, None]).int().argmax(dim=1)

    recalls: dict[str, float] = {}
    for direction, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in ks:
            recalls[f"{direction}/r{k}"] = (rank < k).float().mean().item()
    return recalls


def recall_sum_percent(recalls: dict[str, float]) -> float:
    """RSUM, the usual one-number summary: the sum of all recalls in percent (0-600 for R@1/5/10 both ways)."""
    return 100.0 * sum(recalls.values())


def _one_row_per_index(index: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted distinct indices and, for each, one row holding it (a distributed sampler repeats samples)."""
    unique, inverse = torch.unique(index, return_inverse=True)
    rows = torch.empty_like(unique).scatter_(0, inverse, torch.arange(len(index), device=index.device))
    return unique, rows


def recalls_from_features(
    image_index: Tensor,
    image_features: Tensor,
    caption_index: Tensor,
    caption_image: Tensor,
    caption_features: Tensor,
    ks: tuple[int, ...] = RECALL_KS,
) -> dict[str, float]:
    """Recalls from encoded test features (normalized), each row tagged with its sample index.

    Repeated indices count once. Only the encoded part of the test split is ranked: a caption whose
    image was not encoded, and an image none of whose captions were, are left out (runs limited
    to a few test batches), so the figures are over the same set in both directions.
    """
    images, image_rows = _one_row_per_index(image_index)
    _, caption_rows = _one_row_per_index(caption_index)
    caption_image, caption_features = caption_image[caption_rows].to(images.device), caption_features[caption_rows]
    position = torch.searchsorted(images, caption_image).clamp(max=len(images) - 1)
    encoded = images[position] == caption_image
    if not bool(encoded.any()):
        raise ValueError("no encoded caption belongs to an encoded image; encode more of the test split")
    position, caption_features = position[encoded], caption_features[encoded]
    has_caption = torch.zeros(len(images), dtype=torch.bool, device=images.device)
    has_caption[position] = True
    row_of_image = torch.cumsum(has_caption.long(), dim=0) - 1
    similarity = image_features[image_rows][has_caption] @ caption_features.t()
    return retrieval_recalls(similarity, row_of_image[position], ks)


def contrastive_loss(logits: Tensor, image_index: Tensor) -> Tensor:
    """Symmetric InfoNCE over a batch of (image, caption) pairs; logits are (images, captions).

    Pairs that share an image (two captions of one picture) are both positives, with the target
    mass split between them; without repeats this is CLIP's loss, cross-entropy on the diagonal.
    """
    positives = (image_index[:, None] == image_index[None, :]).to(logits.dtype)
    targets = positives / positives.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
