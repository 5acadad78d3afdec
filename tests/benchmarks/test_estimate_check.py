"""The estimate matches the counted memory of the committed CPU benchmark rows (the check of issue 16)."""

from benchmarks import estimate_check


def test_committed_cpu_rows_are_estimated_within_5_percent(tmp_path):
    results = estimate_check.run("memory_cpu", out_dir=tmp_path)
    modelled = [row for model in results["models"].values() for row in model["rows"].values() if row["modelled"]]
    assert len(modelled) >= 10
    assert results["all_within_tolerance"], results["worst_ratio_error"]
    assert (tmp_path / "estimate_check_cpu.md").read_text().count("**met**") == 1
