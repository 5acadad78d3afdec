"""The activation-quantization benchmark on tiny models: bytes, weight copies, gradients and the written tables."""

import json

import pytest
from figures import capture_saved_figures

from benchmarks import activation_quantization as benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, *extra):
    argv = ["--sizes", "tiny", "--min-numel", "256", "--formats", "int8", "fp8_e4m3", "--output", str(tmp_path)]
    return benchmark.main([*argv, *extra])


def test_full_run_measures_bytes_time_and_gradients(tmp_path, monkeypatch):
    figures = capture_saved_figures(monkeypatch)
    report = _run(tmp_path, "--steps", "1", "--warmup", "0")
    assert set(report["models"]) == {"vit", "llama"}
    for entry in report["models"].values():
        none, *quantized, kept = entry["results"]
        assert none["format"].startswith("none") and none["saved_ratio_vs_unquantized"] == 1.0
        assert [row["format"] for row in quantized] == ["int8", "fp8_e4m3"]
        assert kept["format"] == "int8, weight copies kept"
        # plain autograd holds autocast's weight copies; so does the quantizer told to keep them (never quantized)
        assert 0 < none["saved_weight_copies"] < none["saved_bytes_after"]
        assert kept["saved_weight_copies"] == none["saved_weight_copies"] and kept["tensors_recomputed"] == 0
        assert kept["grad_cosine_min"] == quantized[0]["grad_cosine_min"]  # recasting is exact
        assert kept["saved_ratio_vs_unquantized"] > kept["activation_ratio"]  # the copies weigh on the ratio
        for row in [*quantized, kept]:
            assert row["saved_bytes_before"] == none["saved_bytes_after"]  # the quantizer's count = the counter's
            # bf16 activations in 8 bits with one fp32 scale per 128 values, fp32 ones (the norms') in a quarter
            assert 0.2 < row["activation_ratio"] < 0.55
            assert row["grad_cosine_min"] > 0.9 and row["grad_rel_error"] < 0.2
            assert row["step_ms_min"] > 0 and len(row["step_ms_all"]) == 1
        for row in quantized:  # by default the copies are cast again in backward: not held at all
            assert row["saved_weight_copies"] == 0 and row["tensors_recomputed"] > 0
            assert row["saved_bytes_after"] == kept["saved_bytes_after"] - none["saved_weight_copies"]
    written = json.loads((tmp_path / "activation_quantization_cpu_tiny.json").read_text())
    assert written["sizes"] == "tiny" and not written["saved_only"]
    table = (tmp_path / "activation_quantization_cpu_tiny.md").read_text()
    assert "--sizes tiny" in table and "| int8 |" in table and "grad cos min" in table
    chart = tmp_path / "activation_quantization_cpu_tiny.png"
    assert chart.read_bytes().startswith(b"\x89PNG")
    # per model, one stacked bar per configuration: the activations, then autocast's weight copies on top
    (figure,) = figures
    assert [ax.get_title() for ax in figure.axes] == [e["description"] for e in report["models"].values()]
    for ax, entry in zip(figure.axes, report["models"].values(), strict=True):
        results = entry["results"]
        bars = [(patch.get_x(), patch.get_width()) for patch in ax.patches]
        others = [(r["saved_bytes_after"] - r["saved_weight_copies"]) / 2**30 for r in results]
        copies = [r["saved_weight_copies"] / 2**30 for r in results]
        assert bars == pytest.approx([(0.0, w) for w in others] + list(zip(others, copies, strict=True)))
        assert [label.get_text() for label in ax.get_yticklabels()] == [r["format"] for r in results]
    # --render rebuilds the markdown and the chart from the JSON alone
    chart.unlink()
    (tmp_path / "activation_quantization_cpu_tiny.md").unlink()
    benchmark.main(["--render", str(tmp_path / "activation_quantization_cpu_tiny.json")])
    assert (tmp_path / "activation_quantization_cpu_tiny.md").read_text() == table and chart.exists()


def test_saved_only_runs_forwards_and_agrees_on_bytes(tmp_path):
    full = _run(tmp_path, "--steps", "1", "--warmup", "0")
    saved = _run(tmp_path, "--saved-only")
    assert saved["timed_steps"] == 0
    for name, entry in saved["models"].items():
        for row, full_row in zip(entry["results"], full["models"][name]["results"], strict=True):
            assert row["saved_bytes_after"] == full_row["saved_bytes_after"]
            assert "grad_cosine_min" not in row and "step_ms_min" not in row
    table = (tmp_path / "activation_quantization_cpu_tiny_saved.md").read_text()
    assert "--saved-only" in table and "forward s" in table


def test_saved_only_refuses_compile(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(tmp_path, "--saved-only", "--compile")
    assert "--saved-only" in capsys.readouterr().err


def test_combination_counts_lisa_int8_adamw8bit_against_full_finetuning(tmp_path):
    pytest.importorskip("bitsandbytes")
    report = _run(tmp_path, "--saved-only", "--models", "llama", "--combination", "--lisa-layers", "1")
    entry = report["models"]["llama"]
    combo = entry["combination"]
    lisa, full = combo["lisa_int8_adamw8bit"], combo["full_adamw"]
    assert combo["blocks"] == 2 and combo["lisa_blocks"] == [1]
    assert full["grads"] == full["params"] == lisa["params"] and full["optimizer_state"] == 2 * full["params"]
    assert full["saved"] == entry["results"][0]["saved_bytes_after"]  # the unquantized forward's
    # one of two blocks trains: fewer gradients; 8-bit state (small tiny-model tensors keep 32-bit state): under
    # half of AdamW's two fp32 copies of the same parameters
    assert 0 < combo["trainable_params"] < combo["total_params"]
    assert full["grads"] > lisa["grads"] == 4 * combo["trainable_params"]
    assert 0 < lisa["optimizer_state"] < 0.5 * 2 * lisa["grads"]
    assert 0 < lisa["saved"] < 0.5 * full["saved"]
    assert combo["ratio"] == pytest.approx(sum(lisa.values()) / sum(full.values()))
    table = (tmp_path / "activation_quantization_cpu_tiny_saved.md").read_text()
    assert "LISA + int8 + AdamW8bit" in table and "--combination" in table
    assert (tmp_path / "activation_quantization_cpu_tiny_saved.png").exists()
