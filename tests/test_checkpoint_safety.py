"""Checkpoints are read with weights_only=True everywhere: a crafted file is refused, never executed."""

import os
import random
import subprocess
import sys

import pytest
import torch

from vlm_adapt.checkpoints import read_checkpoint
from vlm_adapt.errors import ConfigError
from vlm_adapt.train import train


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def crafted(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "crafted.ckpt"
    torch.save({"vlm_adapt": {"method": "coop"}, "state_dict": {}, "payload": Exploit(marker)}, path)
    return path, marker


def test_read_checkpoint_refuses_pickled_code(crafted):
    path, marker = crafted
    with pytest.raises(ConfigError, match="objects other than tensors.*could run code"):
        read_checkpoint(path)
    assert not marker.exists()


def test_train_resume_from_a_crafted_checkpoint_is_refused(make_cfg, crafted):
    path, marker = crafted
    with pytest.raises(ConfigError, match="ckpt_path=.*could run code"):
        train(make_cfg("method=coop", f"ckpt_path={path}"))
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["directory", "missing", "random bytes", "truncated", "foreign"])
def test_ckpt_path_that_is_not_a_checkpoint_names_the_fix(kind, tmp_path):
    path = tmp_path / "x.ckpt"
    if kind == "directory":
        path.mkdir()
    elif kind == "random bytes":
        path.write_bytes(random.Random(0).randbytes(256))
    elif kind == "truncated":  # a checkpoint cut short by a crash during the save
        torch.save({"vlm_adapt": {}, "state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(ConfigError, match="ckpt_path=.*(checkpoints/last.ckpt|not written by vlm_adapt)"):
        read_checkpoint(path)


def test_vlm_adapt_eval_refuses_a_crafted_checkpoint(crafted, tmp_path):
    path, marker = crafted
    result = subprocess.run(
        [sys.executable, "-m", "vlm_adapt", "eval", f"ckpt_path={path}", "data=imagenet_samples",
         f"hydra.run.dir={tmp_path / 'eval'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "could run code" in result.stderr + result.stdout
    assert not marker.exists()
