"""Base-to-new class splits: base = the first ceil(C/2) labels, new = the rest, each relabelled from 0."""

from __future__ import annotations

import math

from vlm_adapt.data.splits import Item

SUBSETS = ("all", "base", "new")


def subset_labels(num_classes: int, subset: str) -> list[int]:
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    n_base = math.ceil(num_classes / 2)
    return {"all": list(range(num_classes)), "base": list(range(n_base)),
            "new": list(range(n_base, num_classes))}[subset]


def select_classes(items: list[Item], labels: list[int]) -> list[Item]:
    """Items of the given labels, relabelled to their position in `labels`."""
    remap = {old: new for new, old in enumerate(labels)}
    return [Item(i.path, remap[i.label], i.classname) for i in items if i.label in remap]
