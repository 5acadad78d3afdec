import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_pruning_benchmark_runs_on_tiny_models(tmp_path):
    command = [sys.executable, "-m", "benchmarks.pruning", "--tiny", "--out-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "pruning_cpu_tiny.json").read_text())["results"]
    assert set(data) == {"vit_full", "vit_lora", "llama_full", "llama_lora"}
    for key, row in data.items():
        assert row["pruned"]["params"] < row["unpruned"]["params"], key
        assert row["ratios"]["train_speedup"] > 0 and row["ratios"]["infer_speedup"] > 0
    assert data["vit_lora"]["ratios"]["lora_params"] <= 0.3
    assert "| vit | lora |" in (tmp_path / "pruning_cpu_tiny.md").read_text()


def test_tweet_rows_and_plans_from_summaries():
    """The tweet table shows the check's losses and ratios; a summary rebuilds a plan with the run's shapes."""
    import argparse

    from benchmarks import pruning as bench

    summary = {
        "layers": [{"site": "a.attn", "kind": "heads", "kept": 4, "total": 6}],
        "lora": [
            {"site": "a.q", "adapter": "default", "kept": 0, "total": 8},
            {"site": "a.k", "adapter": "default", "kept": 4, "total": 8},
            {"site": "a.v", "adapter": "default", "kept": 8, "total": 8},
        ],
    }
    plan = bench.plan_from_summary(summary)
    assert plan.heads == {"a.attn": [0, 1, 2, 3]} and plan.lora_removed == ["a.q"]
    assert plan.lora_ranks == {"a.k": {"default": [0, 1, 2, 3]}}
    base = {"val_acc": 0.70, "lora_params_after": 100, "params_after": 1000, "median_step_s": 1.0}
    check = {
        "enabled": True,
        "loss_before": 0.9,
        "loss_after_cut": 0.93,
        "increase": 0.033,
        "tolerance": 0.03,
        "tries": [{"increase": 0.06}, {"increase": 0.033}],
        "used": {"head_ratio": 1 / 3, "neuron_ratio": 1 / 3, "peft_module_ratio": 0.375, "peft_rank_ratio": 0.25},
        "spared": ["peft: ..."],
    }
    pruned = {
        **base,
        "val_acc": 0.69,
        "lora_params_before": 100,
        "lora_params_after": 30,
        "params_before": 1000,
        "params_after": 800,
        "median_step_before_pruning_s": 1.0,
        "median_step_after_pruning_s": 0.8,
        "train_loss_5_before_cut": 1.0,
        "train_loss_5_after_cut": 0.95,
        "check": check,
        "speedup_alternated": {"speedup": 1.3},
    }
    env = {"date": "now", "torch": "x", "threads": 1}
    args = argparse.Namespace(steps=150, lr=1e-3, estimation_steps=50)
    table = bench._tweets_markdown({"lora": base, "lora_early_pruning": pruned}, env, args)
    row = next(line for line in table.splitlines() if line.startswith("| LoRA + EarlyPruning, defaults"))
    assert "| 0.690 | -1.0 | 0.900 -> 0.930 (+3.3%, tolerance 3%), 1 halving(s) | 1.000 -> 0.950 |" in row
    assert "| 0.333, 0.333, 0.375, 0.25 |" in row
    assert "1.30x (in-run 1.25x)" in row
