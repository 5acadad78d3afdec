"""The optimizer-in-backward benchmark runs and shows the gradient peak falling to the largest parameter."""

import json

from benchmarks import optimizer_in_backward


def test_tiny_run_reports_every_method(tmp_path):
    optimizer_in_backward.run("tiny", rounds=1, steps=4, warmup=1, out_dir=tmp_path)
    rows = json.loads((tmp_path / "optimizer_in_backward_tiny.json").read_text())["rows"]
    assert set(rows) == set(optimizer_in_backward.METHODS)
    for method in ("full_in_backward", "lisa_in_backward"):
        assert rows[method]["peak_grad_bytes"] == rows[method]["largest_parameter_bytes"]
        assert rows[method]["max_weight_difference"] == 0.0
    assert rows["full"]["peak_grad_bytes"] == rows["full"]["trainable_bytes"]
    assert "| Full fine-tuning + OptimizerInBackward |" in (tmp_path / "optimizer_in_backward_tiny.md").read_text()
