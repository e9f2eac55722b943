"""Few-shot sampling: K images per class, chosen by a seed, saved so the same seed gives the same images."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from vlm_adapt.data.splits import Item


def sample_few_shot(items: list[Item], shots: int, seed: int) -> list[Item]:
    """Up to `shots` items per class, drawn with `random.Random(seed)` from items sorted by path."""
    by_class: dict[int, list[Item]] = defaultdict(list)
    for item in sorted(items, key=lambda i: (i.label, i.path)):
        by_class[item.label].append(item)
    rng = random.Random(seed)
    chosen: list[Item] = []
    for label in sorted(by_class):
        pool = by_class[label]
        chosen += pool if len(pool) <= shots else rng.sample(pool, shots)
    return chosen


def load_or_sample_few_shot(items: list[Item], shots: int, seed: int, cache_file: Path | None) -> list[Item]:
    """Reuse the sample saved in `cache_file` when it exists, otherwise draw it and save it there."""
    if cache_file is not None and cache_file.is_file():
        return [Item(*row) for row in json.loads(cache_file.read_text())]
    chosen = sample_few_shot(items, shots, seed)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([[i.path, i.label, i.classname] for i in chosen]))
        tmp.replace(cache_file)  # atomic: concurrent sweep jobs never read half a file
    return chosen
