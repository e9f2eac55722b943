"""CoOp's own few-shot samples: `split_fewshot/shot_{K}-seed_{S}.pkl` under a dataset root.

CoOp and its Dassl forks pickle `{"train": [Datum, ...], "val": [Datum, ...]}` (ImageNet: train only),
drawn over all classes before any base/new subsetting. With these files a run trains on exactly the
images of the papers' per-seed runs. They are read with an unpickler that builds only Dassl's `Datum`
records (as plain attribute holders) and refuses every other object, so a crafted file cannot run code.
Each Datum's absolute image path (from the machine that wrote it) is matched to the split by its
trailing path components; a path or label the split does not have is an error.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from vlm_adapt.data.splits import Item
from vlm_adapt.errors import DatasetNotFoundError


class DatumRecord:
    """Stand-in for `dassl.data.datasets.base_dataset.Datum` (attributes _impath, _label, _classname)."""


class _DatumUnpickler(pickle.Unpickler):
    SAFE = {("copyreg", "_reconstructor"), ("builtins", "object")}

    def find_class(self, module: str, name: str) -> Any:
        if name == "Datum" and module.split(".")[0] == "dassl":
            return DatumRecord
        if (module, name) in self.SAFE:
            return getattr(__import__(module), name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only Dassl Datum records are allowed")


def coop_few_shot_path(root: str | Path, shots: int, seed: int) -> Path:
    return Path(root).expanduser() / "split_fewshot" / f"shot_{shots}-seed_{seed}.pkl"


def read_coop_few_shot(path: Path, pool: list[Item]) -> dict[str, list[Item]]:
    """{"train": [...], "val": [...]} of the pickle, as items of `pool` (the dataset's train + val splits)."""
    try:
        with open(path, "rb") as handle:
            raw = _DatumUnpickler(handle).load()
        splits = {split: [(str(d._impath), int(d._label)) for d in raw[split]] for split in raw}
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, KeyError, TypeError, ValueError) as err:
        raise DatasetNotFoundError(
            f"data.few_shot_file={path} is not a CoOp few-shot file ({type(err).__name__}: {err}); it must be "
            "a split_fewshot/shot_K-seed_S.pkl written by CoOp / Dassl. Remove it or set data.few_shot_file=null."
        ) from err
    by_path = {item.path.replace("\\", "/").removeprefix("./"): item for item in pool}
    result: dict[str, list[Item]] = {}
    for split, entries in splits.items():
        items = []
        for impath, label in entries:
            parts = impath.replace("\\", "/").split("/")
            match = next((by_path[s] for s in ("/".join(parts[i:]) for i in range(len(parts))) if s in by_path), None)
            if match is None or match.label != label:
                problem = (
                    "is not in the split" if match is None else f"has label {match.label} in the split, not {label}"
                )
                raise DatasetNotFoundError(
                    f"{path}: image {impath} {problem}. The few-shot file belongs to another version of this "
                    "dataset's split; use the matching split_zhou file or set data.few_shot_file=null."
                )
            items.append(match)
        result[split] = items
    return result
