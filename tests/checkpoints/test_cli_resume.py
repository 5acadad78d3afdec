"""Through the console script: a run killed (SIGKILL) mid-epoch and resumed from last.ckpt sees the batches of the
uninterrupted run and ends with the same weights and optimizer state, bit for bit."""

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

CONFIG = """
seed_everything: 3
trainer:
  accelerator: cpu
  max_epochs: 2
  limit_train_batches: 10
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  callbacks:
    - class_path: ModelCheckpoint
      init_args: {save_last: true, save_top_k: 0, every_n_train_steps: 4}
    - class_path: cli_probes.BatchLog
      init_args: {path: batches.txt}
model:
  class_path: ImageClassifier
  init_args:
    model_name: vit_tiny_patch16_224
    num_classes: 10
    # dropout: the resumed run must continue the random stream too
    model_kwargs: {img_size: 16, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2, drop_rate: 0.2}
data:
  class_path: Digits
  init_args: {image_size: 16, batch_size: 8}
"""


def _run(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    folder.mkdir(exist_ok=True)
    (folder / "run.yaml").write_text(CONFIG)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    command = [shutil.which("lightning-peft"), "fit", "--config", "run.yaml", *extra]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_killed_mid_epoch_and_resumed_through_the_cli_is_bit_identical(tmp_path):
    full = _run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _run(tmp_path / "killed", "--trainer.callbacks.init_args.kill_at_step=14")  # epoch 1, batch 4
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 12
    resumed = _run(tmp_path / "resumed", "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    batches = (tmp_path / "full" / "batches.txt").read_text().splitlines()
    before = (tmp_path / "killed" / "batches.txt").read_text().splitlines()
    after = (tmp_path / "resumed" / "batches.txt").read_text().splitlines()
    assert len(batches) == 20 and before[:12] + after == batches
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 20
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    for key, state in a["optimizer_states"][0]["state"].items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer_states"][0]["state"][key][field]))
