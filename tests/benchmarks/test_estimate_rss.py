"""The estimate-against-peak-memory benchmark runs each row in a fresh process and compares the differences."""

import json

import pytest
import torch

from benchmarks import estimate_rss


def test_tiny_run_measures_each_row_in_a_fresh_process(tmp_path):
    results = estimate_rss.run("tiny", rows=["full+in_backward"], out_dir=tmp_path)
    stored = json.loads((tmp_path / "estimate_rss_tiny.json").read_text())
    assert stored["baseline"] == "lora" and list(stored["rows"]) == ["lora", "full+in_backward"]
    for row in stored["rows"].values():
        assert row["peak"] > row["rss_before_fit"] > 0
        assert row["malloc_mmap_threshold"] == estimate_rss.MMAP_THRESHOLD  # set for the child, as compared
        assert not row["out_of_memory"]
    full = stored["rows"]["full+in_backward"]
    # the estimate of the row: all parameters train, and one gradient at a time is held
    assert full["trainable_params"] == sum(
        p.numel() for p in estimate_rss.LlamaLM(estimate_rss.SIZES["tiny"]).parameters()
    )
    assert 0 < full["estimated"]["grads"] < full["estimated"]["params"]
    assert full["predicted_difference"] == full["estimated"]["total"] - stored["rows"]["lora"]["estimated"]["total"]
    assert full["measured_difference"] == full["peak"] - stored["rows"]["lora"]["peak"]
    assert results["worst_relative_error"] == full["relative_error"]
    text = (tmp_path / "estimate_rss_tiny.md").read_text()
    assert "MALLOC_MMAP_THRESHOLD_=131072" in text and "| Full FT + optimizer in backward |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip without CUDA")
def test_gpu_mode_is_skipped_without_cuda(capsys):
    estimate_rss.main(["--mode", "gpu"])
    assert "needs a CUDA GPU" in capsys.readouterr().out
