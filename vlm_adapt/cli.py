"""The `vlm-adapt` command: `train`, `eval`, `bench` and `report` sub-commands.

`train` and `eval` are Hydra apps (all Hydra overrides and `-m` multirun work); the sub-command
name is removed from argv before Hydra parses it.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("vlm_adapt.train", "train a method and evaluate it: vlm-adapt train method=coop data=imagenette"),
    "eval": ("vlm_adapt.eval.evaluate", "evaluate a checkpoint: vlm-adapt eval ckpt_path=RUN/checkpoints/last.ckpt"),
    "bench": ("vlm_adapt.bench", "cost benchmark of every method: vlm-adapt bench backbone=vit_b16"),
    "report": ("vlm_adapt.report.cli", "tables and plots from sweeps: vlm-adapt report outputs/train/multiruns/..."),
}

USAGE = "usage: vlm-adapt {train,eval,bench,report} [hydra overrides or options]\n\n" + "\n".join(
    f"  {name:<7} {text}" for name, (_, text) in COMMANDS.items()
)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command = args[0]
    if command not in COMMANDS:
        print(f"vlm-adapt: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [f"vlm-adapt-{command}", *args[1:]]
    importlib.import_module(COMMANDS[command][0]).main()
