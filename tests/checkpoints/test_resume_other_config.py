"""Resuming under a config whose model arguments differ from the checkpoint's is refused, naming the arguments:
LightningCLI would otherwise replace the config's values by the checkpoint's without a word."""

import pytest

from lightning_peft.cli import PeftCLI, cli_main
from lightning_peft.cli.errors import DEBUG_ENV, UserError

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = """
seed_everything: 3
trainer:
  accelerator: cpu
  max_steps: 2
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  callbacks:
    - class_path: ModelCheckpoint
      init_args: {save_last: true, save_top_k: 0, every_n_train_steps: 2}
model:
  class_path: ImageClassifier
  init_args:
    model_name: vit_tiny_patch16_224
    num_classes: 10
    model_kwargs: {img_size: 16, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}
data:
  class_path: Digits
  init_args: {image_size: 16, batch_size: 8}
"""
LORA = "model:\n  init_args:\n    peft: {peft_type: LORA, r: 4, target_modules: [qkv]}\n"


def test_resume_under_other_model_arguments_is_refused_naming_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    (tmp_path / "run.yaml").write_text(CONFIG)
    (tmp_path / "lora.yaml").write_text(LORA)
    PeftCLI(args=["fit", "--config", "run.yaml"])
    last = str(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(UserError, match=r"other model arguments than the config's: `peft` \(checkpoint: None; config"):
        PeftCLI(args=["fit", "--config", "run.yaml", "--config", "lora.yaml", "--ckpt_path", last])
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", "run.yaml", "--model.init_args.num_classes=3", "--ckpt_path", last])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "`num_classes` (checkpoint: 10; config: 3)" in err and "HINT:" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    resumed = PeftCLI(args=["fit", "--config", "run.yaml", "--trainer.max_steps=3", "--ckpt_path", last])
    assert resumed.trainer.global_step == 3  # the same model arguments resume as before
