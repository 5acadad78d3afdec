import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_pruning_benchmark_runs_on_tiny_models(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "pruning.py"), "--tiny", "--out-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "pruning_cpu_tiny.json").read_text())["results"]
    assert set(data) == {"vit_full", "vit_lora", "llama_full", "llama_lora"}
    for key, row in data.items():
        assert row["pruned"]["params"] < row["unpruned"]["params"], key
        assert row["ratios"]["train_speedup"] > 0 and row["ratios"]["infer_speedup"] > 0
    assert data["vit_lora"]["ratios"]["lora_params"] <= 0.3
    assert "| vit | lora |" in (tmp_path / "pruning_cpu_tiny.md").read_text()
