"""Few-shot sampling: K images per class, chosen by a seed, saved so the same seed gives the same images.

A saved sample is keyed by a hash of the pool it was drawn from (every path, label and class name of
the split), so a second copy or a new version of a dataset under the same name never reuses another
copy's sample; on reading, the sample is checked against the current pool and redrawn if it does not
belong to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import defaultdict
from pathlib import Path

from vlm_adapt.data.splits import Item

log = logging.getLogger(__name__)


def pool_fingerprint(items: list[Item]) -> str:
    """A short content hash of a list of items, independent of their order."""
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda i: (i.path, i.label, i.classname)):
        digest.update(f"{item.path}\t{item.label}\t{item.classname}\n".encode())
    return digest.hexdigest()[:16]


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


def _read_saved(cache_file: Path, pool: list[Item], fingerprint: str) -> list[Item] | None:
    """The saved sample if it is readable and drawn from `pool` (whose fingerprint is given); None (redraw)
    otherwise."""
    try:
        saved = json.loads(cache_file.read_text())
        chosen = [Item(str(p), int(label), str(name)) for p, label, name in saved["items"]]
        saved_fingerprint = saved["pool"]
    except (OSError, ValueError, TypeError, KeyError) as err:
        _move_aside(cache_file, f"{type(err).__name__}: {err}")
        return None
    members = set(pool)
    if saved_fingerprint != fingerprint or not all(item in members for item in chosen):
        log.warning("Few-shot sample %s was drawn from another version of the split; drawing it again.", cache_file)
        return None
    return chosen


def _move_aside(cache_file: Path, reason: str) -> None:
    """Keep a corrupt saved sample as `<name>.corrupt` (for inspection) and say so; the sample is then drawn
    again, which reproduces it: the draw depends only on the pool and the seed."""
    aside = cache_file.with_name(cache_file.name + ".corrupt")
    try:
        cache_file.replace(aside)
    except OSError:  # another job of a sweep moved it first, or the folder is read-only
        aside = None
    log.warning(
        "Few-shot sample %s is corrupt (%s)%s; drawing it again with the same seed (the same images).",
        cache_file, reason, f", moved to {aside}" if aside else "",
    )


def load_or_sample_few_shot(items: list[Item], shots: int, seed: int, cache_dir: Path | None, stem: str) -> list[Item]:
    """Reuse the sample saved as `<cache_dir>/<stem>_<pool hash>.json` when it belongs to `items`,
    otherwise draw it and save it there (atomically: concurrent sweep jobs never read half a file)."""
    if cache_dir is None:
        return sample_few_shot(items, shots, seed)
    fingerprint = pool_fingerprint(items)
    cache_file = cache_dir / f"{stem}_{fingerprint}.json"
    if cache_file.is_file():
        chosen = _read_saved(cache_file, items, fingerprint)
        if chosen is not None:
            return chosen
    chosen = sample_few_shot(items, shots, seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".{random.getrandbits(32):08x}.tmp")
    tmp.write_text(json.dumps({"pool": fingerprint, "items": [[i.path, i.label, i.classname] for i in chosen]}))
    tmp.replace(cache_file)
    return chosen
