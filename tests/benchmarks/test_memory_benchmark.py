"""The memory benchmark on tiny models: every method is measured, LISA really releases optimizer state, and
activation quantization really shrinks what is saved for backward."""

import json

import pytest
import torch
from torch import nn

from benchmarks import harness, memory


def test_storage_bytes_counts_a_shared_storage_once():
    base = torch.zeros(16, 16)
    assert harness.storage_bytes([base, base.t(), base[:4]]) == 16 * 16 * 4
    assert harness.storage_bytes([base, torch.zeros(4)]) == 16 * 16 * 4 + 4 * 4


def test_saved_tensor_counter_excludes_parameters():
    layer = nn.Linear(8, 8)
    counter = harness.SavedTensorCounter({p.untyped_storage().data_ptr() for p in layer.parameters()})
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        layer(x).sum().backward()
    assert counter.nbytes == x.untyped_storage().nbytes()  # the input, not the weight


OURS = [m for m in memory.METHODS if m not in memory.PEER_METHODS]


def test_tiny_run_measures_every_method_and_lisa_releases_state(tmp_path):
    memory.run(mode="cpu", sizes="tiny", out_dir=tmp_path, methods=OURS)

    results = json.loads((tmp_path / "memory_cpu.json").read_text())
    assert (tmp_path / "memory_cpu.md").read_text().startswith("# Memory and step time")
    assert set(results["models"]) == {spec.key for spec in memory.SIZES["tiny"]}
    assert {"torch", "lightning", "device", "date"} <= set(results["environment"])
    for key, model in results["models"].items():
        methods = model["methods"]
        assert set(methods) == set(OURS), key
        for method in methods.values():
            assert method["memory_bytes"] > 0 and method["step_time_ms"] > 0
            assert len(method["step_times_ms"]) == results["schedule"]["timed"] * results["schedule"]["repeats"]
        state = {name: m["components"]["optimizer_state_bytes"] for name, m in methods.items()}
        # Released: only the sampled blocks (and the parts outside the stack) keep AdamW state.
        assert state["lisa"] < state["lisa_kept"], key
        assert state["lisa"] < state["full"], key
        assert methods["lisa"]["blocks_with_state"] == memory.LISA_LAYERS
        # Kept: run until every block was sampled, so its state is that of full fine-tuning.
        assert methods["lisa_kept"]["blocks_with_state"] == methods["lisa_kept"]["n_blocks"]
        assert state["lisa_kept"] == state["full"], key
        assert methods["lisa"]["components"]["grad_bytes"] < methods["full"]["components"]["grad_bytes"]
        assert methods["lisa"]["controller"]["steps"] > 0
        # Activation quantization: the saved bytes are what the quantizer keeps, well below the unquantized run's,
        # and its own count of the unquantized bytes matches the script's counter on that run.
        saved = {name: m["components"]["saved_activation_bytes"] for name, m in methods.items()}
        for method, base in memory.UNQUANTIZED.items():
            if method not in methods:
                continue
            stats = methods[method]["quantization"]
            assert stats["num_quantized"] > 0, (key, method)
            assert saved[method] == stats["bytes_after"] < stats["bytes_before"], (key, method)
            assert saved[method] < 0.55 * saved[base], (key, method)
            assert stats["bytes_before"] == pytest.approx(saved[base], rel=0.02), (key, method)
            assert methods[method]["unquantized_method"] == base
        # The combination: LISA's trainable set, 8-bit optimizer state.
        assert methods["lisa_int8_adamw8bit"]["blocks_with_state"] == memory.LISA_LAYERS
        assert state["lisa_int8_adamw8bit"] < state["lisa"], key
        assert methods["lisa_int8_adamw8bit"]["memory_bytes"] < methods["lisa"]["memory_bytes"], key
        targets = {t["target"] for t in model["targets"]}
        assert sum("saved-for-backward bytes" in t for t in targets) == len(set(memory.UNQUANTIZED) & set(OURS)), key
    assert results["controller_cost"]["steps"] > 0


def test_peers_run_and_do_what_they_are_for(tmp_path):
    pytest.importorskip("badam")
    pytest.importorskip("galore_torch")
    results = memory.run(
        mode="cpu", sizes="tiny", out_dir=tmp_path, models=["llama_tiny"], methods=list(memory.PEER_METHODS)
    )
    assert set(memory.PEER_METHODS) <= set(results["methods"])
    methods = results["models"]["llama_tiny"]["methods"]
    c = {name: m["components"] for name, m in methods.items()}
    # checkpointing: the forward leaves only block inputs (and what lies outside the blocks) saved
    assert c["full_checkpointing"]["saved_activation_bytes"] < 0.5 * c["full"]["saved_activation_bytes"]
    assert c["lisa_checkpointing"]["grad_bytes"] < c["full_checkpointing"]["grad_bytes"]
    assert methods["full_int8_checkpointing"]["quantization"]["num_quantized"] > 0
    # save_on_cpu: the same step (on a CPU the counted bytes do not move anywhere)
    assert c["full_offload"]["saved_activation_bytes"] == c["full"]["saved_activation_bytes"]
    # BAdam: one block trains; its state (with the float32 copy of that block) is far below AdamW's
    assert methods["badam"]["trainable_params"] < 0.5 * methods["full"]["trainable_params"]
    assert 0 < c["badam"]["optimizer_state_bytes"] < 0.5 * c["full"]["optimizer_state_bytes"]
    # GaLore: every parameter trains; the projection matrices are counted with the state
    assert methods["galore"]["trainable_params"] == methods["full"]["trainable_params"]
    assert c["galore"]["optimizer_state_bytes"] > 0


def test_method_subset_adds_the_runs_it_compares_with(tmp_path):
    results = memory.run(mode="cpu", sizes="tiny", out_dir=tmp_path, models=["llama_tiny"], methods=["full_fp8_e4m3"])
    assert results["methods"] == ["full", "full_fp8_e4m3"]
    methods = results["models"]["llama_tiny"]["methods"]
    assert set(methods) == {"full", "full_fp8_e4m3"}
    assert methods["full_fp8_e4m3"]["saved_bytes_ratio"] < 0.55
    assert "fp8_e4m3" in (tmp_path / "memory_cpu.md").read_text()
    with pytest.raises(ValueError, match="unknown method"):
        memory.run(mode="cpu", sizes="tiny", out_dir=tmp_path, methods=["full_int4"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_mode_without_cuda_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        memory.run(mode="gpu", out_dir=tmp_path)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        memory.main(["--mode", "gpu", "--out-dir", str(tmp_path)])
