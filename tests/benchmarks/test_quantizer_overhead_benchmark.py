"""The quantizer host-time micro-benchmark runs and reports every configuration."""

import json

from benchmarks import quantizer_overhead


def test_tiny_run_reports_every_size_dtype_and_path(tmp_path):
    quantizer_overhead.run(rounds=1, tensors=4, compile=False, out_dir=tmp_path)
    results = json.loads((tmp_path / "quantizer_overhead_cpu.json").read_text())
    rows = results["rows"]
    assert len(rows) == len(quantizer_overhead.SHAPES) * len(quantizer_overhead.DTYPES)
    for row in rows:
        assert row["hook_us"] > 0 and row["kernels_us"] > 0 and row["reference_us"] > 0
        assert row["saved_per_step"] > 0
    assert "Target: pack + unpack <= 40 us" in (tmp_path / "quantizer_overhead_cpu.md").read_text()
