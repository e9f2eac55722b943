"""Lightning's `ddp` strategy under Hydra: the extra ranks re-run exactly the current job, in its directory.

On one machine Lightning starts ranks 1..N-1 of a `ddp` run by re-running the command line
(`python <argv[0]> argv[1:]`, or `python -m <main module> argv[1:]`) with
`hydra.run.dir=<HydraConfig run.dir>` appended. Under `vlm-adapt` that goes wrong twice: cli.py
has replaced argv[0] and removed the sub-command, and in a multirun the command line is the whole
sweep (`-m method=a,b`), so each extra rank would start a sweep of its own in new directories.
`point_ddp_relaunch_at_job` makes the command line that of the current job (its own overrides, no
sweep) and its run directory the job's output directory. Under Slurm or torchrun the ranks are
started by the cluster and nothing is re-run.

Hydra's basic launcher runs a multirun's jobs one after another in one process, so the process
group, rank variables and command line left from the previous job's launch are reset first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from omegaconf import read_write

from vlm_adapt.errors import ConfigError

# what Lightning's launcher sets in this process when it starts the other ranks
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_before_launch: tuple[list[str], dict[str, str | None]] | None = None  # (sys.argv, LAUNCH_ENV values)


def end_previous_launch() -> None:
    """Drop the process group, rank variables and command line of ranks launched for an earlier job."""
    global _before_launch
    if _before_launch is None:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.argv, env = _before_launch
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _before_launch = None


def relaunches_script(trainer: L.Trainer) -> bool:
    """Whether this trainer starts its other ranks by re-running the command line (local `ddp`)."""
    launcher = trainer.strategy.launcher
    if not isinstance(launcher, _SubprocessScriptLauncher):
        return False
    return not launcher.cluster_environment.creates_processes_externally


def point_ddp_relaunch_at_job(trainer: L.Trainer, output_dir: str | Path) -> None:
    """Make Lightning's `ddp` re-run of the command line run this Hydra job alone, in `output_dir`."""
    global _before_launch
    end_previous_launch()
    if not relaunches_script(trainer) or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    command = hydra_cfg.job.config_name  # the vlm-adapt sub-command: `train` or `eval`
    if Path(sys.argv[0]).name != f"vlm-adapt-{command}":  # set by cli.py
        raise ConfigError(
            f"trainer.strategy={trainer.strategy.__class__.__name__} on {trainer.num_devices} local devices starts "
            f"its other ranks by re-running the `vlm-adapt {command}` command, but this process was not started by "
            f"it. Run `vlm-adapt {command} ...`, or use one device."
        )
    # console script: `python <script> ...`; `python -m vlm_adapt`: Lightning uses the module and ignores argv[0]
    script = str(Path(getattr(sys.modules["__main__"], "__file__", None) or sys.argv[0]).resolve())
    _before_launch = (sys.argv, {name: os.environ.get(name) for name in LAUNCH_ENV})
    sys.argv = [script, command, *hydra_cfg.overrides.task]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = str(output_dir)
