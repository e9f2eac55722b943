"""Input checks run once, where the input is read: every problem of one input is reported in one message.

`Problems` collects problems by kind (at most `EXAMPLES` examples each, with a count) and raises them
together, so a user fixes a split file or a config in one go instead of one error per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm_adapt.errors import ConfigError, DatasetNotFoundError, VlmAdaptError

EXAMPLES = 10  # examples listed per kind of problem
MISSING = (None, "", "???")  # a config value that was never set (OmegaConf leaves '???' as the string)


class Problems:
    """Problems found in one input, grouped by kind, reported in one error."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, kind: str, example: str | None = None) -> None:
        """Count one problem of `kind`; keep `example` among the first EXAMPLES of that kind."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        examples = self.examples.setdefault(kind, [])
        if example is not None and len(examples) < EXAMPLES:
            examples.append(example)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def lines(self) -> list[str]:
        """One line per kind: `<count> <kind>: example; example; ... (and N more)`."""
        lines = []
        for kind, count in self.counts.items():
            examples = self.examples[kind]
            line = f"  - {count} {kind}" + (f": {'; '.join(examples)}" if examples else "")
            if examples and count > len(examples):
                line += f" (and {count - len(examples)} more)"
            lines.append(line)
        return lines

    def raise_if_any(self, header: str, fix: str, error: type[VlmAdaptError] = DatasetNotFoundError) -> None:
        """Raise `error` listing every kind of problem under `header`, ending with how to `fix` them."""
        if self:
            raise error("\n".join([header, *self.lines(), fix]))


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_loader_args(batch_size: Any, eval_batch_size: Any, num_workers: Any) -> None:
    """Batch sizes must be positive integers and num_workers a non-negative one; ConfigError names each key."""
    problems = []
    if not is_positive_int(batch_size):
        problems.append(f"method.batch_size={batch_size!r}: use a positive integer (images per step), e.g. 32")
    if not is_positive_int(eval_batch_size):
        problems.append(f"loader.eval_batch_size={eval_batch_size!r}: use a positive integer, e.g. 64")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        problems.append(f"loader.num_workers={num_workers!r}: use 0 (load in the main process) or more")
    if problems:
        raise ConfigError("Invalid loader settings:\n" + "\n".join(f"  - {p}" for p in problems))


def check_shots(shots: Any) -> int | None:
    """`protocol.shots`: a positive integer (images per class) or None (every training image)."""
    if shots is None or is_positive_int(shots):
        return shots
    raise ConfigError(
        f"protocol.shots={shots!r} is not a number of training images per class: use a positive integer "
        "(protocol.shots=16; the papers use 1, 2, 4, 8, 16) or protocol.shots=null to train on every image."
    )


def check_root(dataset: dict[str, Any], key: str = "data") -> Path:
    """The dataset root, which must be set and exist; `key` is where the config holds it (data, protocol.targets.X)."""
    root = dataset.get("root")
    name = dataset.get("name", "dataset")
    if root in MISSING:
        if dataset.get("layout") == "image_folder":
            raise ConfigError(f"data={name} needs {key}.root=/path/to/folder (with {_layout(dataset)}).")
        raise ConfigError(f"data={name} needs {key}.root=/path/to/{name} (with {_layout(dataset)}).")
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"Dataset {name!r}: {key}.root={root} does not exist. Set {key}.root=/path/to/{name} (with "
            f"{_layout(dataset)}), or VLM_ADAPT_DATA_DIR for all datasets; conf/data/{name}.yaml has the details."
        )
    return path


def _layout(dataset: dict[str, Any]) -> str:
    """What a dataset root holds, in a few words."""
    layout, image_dir = dataset.get("layout", "coop"), dataset.get("image_dir", "images")
    if layout == "image_folder":
        return f"{image_dir}/<class>/... and {dataset.get('classnames_file', 'classnames.txt')}"
    if layout == "coop":
        return f"{dataset.get('split_file', 'split_zhou_<Name>.json')} and the images under {image_dir}/"
    return "annotations/captions_<split>2017.json and an image folder per split"
