"""Mixed precision: bf16-mixed trains on CPU; fp16 mixed precision on CPU is refused, naming the fix."""

import json
import math

import pytest

from vlm_adapt.errors import ConfigError
from vlm_adapt.train import train


def test_bf16_mixed_cpu_run_completes(make_cfg, tmp_path):
    cfg = make_cfg("method=coop", "trainer.precision=bf16-mixed", "loader.eval_batch_size=20",
                   "trainer.limit_test_batches=2")
    train(cfg)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "completed"
    assert record["cost"]["train_steps"] == 2  # 20 images, batches of 8, the last partial one dropped (Dassl)
    assert all(math.isfinite(v) for v in record["metrics"].values())
    assert 0.0 <= record["metrics"]["test/imagenette/acc"] <= 100.0


def test_fp16_mixed_on_cpu_is_refused_with_the_fix(make_cfg, tmp_path):
    # Lightning would run it as bf16-mixed with only a warning, and the run would be recorded as fp16
    cfg = make_cfg("method=zero_shot", "trainer.precision=16-mixed")
    with pytest.raises(ConfigError, match="trainer.precision=bf16-mixed"):
        train(cfg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_pure_fp16_on_cpu_is_refused_with_the_fix(make_cfg, tmp_path):
    cfg = make_cfg("method=coop", "trainer.precision=16-true")
    with pytest.raises(ConfigError, match="pure fp16.*needs a GPU.*bf16-mixed or 32-true"):
        train(cfg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_precision_and_activation_are_recorded(make_cfg, tmp_path):
    train(make_cfg("method=zero_shot", "trainer.limit_test_batches=1"))
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (record["precision"], record["quick_gelu"], record["few_shot"]["source"]) == ("32-true", True, "sampled")
    assert (record["few_shot"]["requested"], record["few_shot"]["per_class_min"]) == (2, 2)
