"""The train entry point runs end to end on the tiny backbone and writes its run directory."""

import json

from vlm_adapt.train import train


def test_coop_run_writes_metrics_and_tiny_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg("method=coop")
    train(cfg)
    run = tmp_path / "run"
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "completed"
    assert 0.0 <= record["metrics"]["test/imagenette/acc"] <= 100.0
    assert record["cost"]["trainable_params"] == 16 * 64
    assert (run / "checkpoints" / "last.ckpt").stat().st_size < 100_000
