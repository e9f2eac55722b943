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

from vlm_adapt.data.checks import Problems
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


def _describe(path: Path, explicit: bool) -> tuple[str, str]:
    """How to name the file in a message, and how to stop using it."""
    if explicit:
        return f"data.few_shot_file={path}", "set data.few_shot_file=null (vlm_adapt then draws its own sample)"
    return (
        f"{path} (CoOp's few-shot file, found under data.root and used by default)",
        f"move it out of {path.parent} (vlm_adapt then draws its own sample)",
    )


def read_coop_few_shot(path: Path, pool: list[Item], explicit: bool = True) -> dict[str, list[Item]]:
    """{"train": [...], "val": [...]} of the pickle, as items of `pool` (the dataset's train + val splits).

    `explicit`: the file was given as data.few_shot_file (else found under the root); messages say how
    to stop using it either way. Every image that does not match the split is listed in one error.
    """
    name, remedy = _describe(path, explicit)
    try:
        with open(path, "rb") as handle:
            raw = _DatumUnpickler(handle).load()
        if not isinstance(raw, dict) or "train" not in raw:
            raise TypeError(f"expected a dict with 'train' (and 'val'), found {type(raw).__name__}")
        splits = {split: [(str(d._impath), int(d._label)) for d in raw[split]] for split in raw}
    except Exception as err:  # a corrupt pickle fails in many ways; each means "not CoOp's file"
        raise DatasetNotFoundError(
            f"{name} is not a CoOp few-shot file ({type(err).__name__}: {err}); it must be a "
            f"split_fewshot/shot_K-seed_S.pkl written by CoOp / Dassl. Replace it, or {remedy}."
        ) from err
    by_path = {item.path.replace("\\", "/").removeprefix("./"): item for item in pool}
    problems = Problems()
    result: dict[str, list[Item]] = {}
    for split, entries in splits.items():
        items = []
        for impath, label in entries:
            parts = impath.replace("\\", "/").split("/")
            match = next((by_path[s] for s in ("/".join(parts[i:]) for i in range(len(parts))) if s in by_path), None)
            if match is None:
                problems.add("images not in the split (the file belongs to another version of the split)",
                             f"{split}: {impath}")
            elif match.label != label:
                problems.add("images with another label in the split (another version of the split)",
                             f"{split}: {impath} is label {match.label} in the split, {label} here")
            else:
                items.append(match)
        result[split] = items
    problems.raise_if_any(
        f"{name} does not match the dataset's split:",
        f"Use the split_zhou file this few-shot file was drawn from, or {remedy}.",
    )
    return result
