"""The frozen-prefix benchmark runs, every row has the same loss and gradients, and the prefix saves bytes."""

import json

from benchmarks import lisa_frozen_prefix


def test_one_round_reports_every_row_and_the_prefix_savings(tmp_path):
    lisa_frozen_prefix.main(["--rounds", "1", "--out-dir", str(tmp_path)])
    results = json.loads((tmp_path / "lisa_frozen_prefix_cpu.json").read_text())
    rows = {row["row"]: row for row in results["rows"]}
    assert list(rows) == list(lisa_frozen_prefix.ROWS)
    assert len({row["loss"] for row in rows.values()}) == 1
    assert all(row["max_grad_difference_vs_frozen"] == 0 for row in rows.values())
    assert rows["frozen"]["saved_bytes"] < rows["always"]["saved_bytes"]
    assert rows["marked_prefix"]["saved_bytes"] < 0.7 * rows["marked"]["saved_bytes"]
    assert rows["checkpointing_prefix"]["saved_bytes"] < rows["checkpointing"]["saved_bytes"]
    # five frozen blocks, in the warm-up step and the one timed round
    assert rows["marked_prefix"]["calls_without_graph"] == 10 and rows["marked"]["calls_without_graph"] is None
    assert "no-grad prefix" in (tmp_path / "lisa_frozen_prefix_cpu.md").read_text()
