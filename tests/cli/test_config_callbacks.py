"""Callbacks of several `--config` files: a later file's are added (or replace one of the same class), never merged
into a shipped callback by position, and the shipped checkpoint callbacks stay unless the user empties the list."""

import logging
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import GradientAccumulationScheduler, LambdaCallback, ModelCheckpoint

from lightning_peft.callbacks import LISA, HalfFineTuning
from lightning_peft.cli import PeftCLI
from lightning_peft.cli.config_callbacks import combine_config_callbacks

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = str(Path(__file__).parents[2] / "configs" / "vit_digits_lisa.yaml")
# The user's step checkpoint at list position 1 of a list as long as the shipped one: jsonargparse alone merges it
# into the shipped best-checkpoint callback (and its `monitor: val/acc`).
STEP_CHECKPOINT = """trainer:
  callbacks:
    - class_path: GradientAccumulationScheduler
      init_args: {{scheduling: {{0: 1}}}}
    - class_path: ModelCheckpoint
      init_args: {{every_n_train_steps: 2, save_last: true, save_top_k: -1, dirpath: {dirpath}, filename: "s-{{step}}"}}
    - class_path: LambdaCallback
"""
HFT_ONLY = "trainer:\n  callbacks:\n    - class_path: HalfFineTuning\n      init_args: {ratio: 0.5}\n"
QUICK = [
    "--trainer.max_steps=4",
    "--trainer.limit_val_batches=1",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.batch_size=8",
]


def test_a_users_checkpoint_is_added_not_merged_and_writes_its_steps(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    mine = tmp_path / "mine.yaml"
    mine.write_text(STEP_CHECKPOINT.format(dirpath=tmp_path / "steps"))
    cli = PeftCLI(args=["fit", "--config", CONFIG, "--config", str(mine), *QUICK])
    checkpoints = cli.trainer.checkpoint_callbacks
    assert [cb.monitor for cb in checkpoints] == [None, "val/acc", None]  # the shipped two, then the user's own
    assert checkpoints[2]._every_n_train_steps == 2 and checkpoints[1]._every_n_train_steps == 0
    assert any(isinstance(cb, LISA) for cb in cli.trainer.callbacks)
    assert any(isinstance(cb, GradientAccumulationScheduler) for cb in cli.trainer.callbacks)
    assert any(isinstance(cb, LambdaCallback) for cb in cli.trainer.callbacks)
    written = sorted(path.name for path in (tmp_path / "steps").glob("s-*.ckpt"))
    assert written == ["s-step=2.ckpt", "s-step=4.ckpt"], written
    added = "adds GradientAccumulationScheduler; adds ModelCheckpoint; adds LambdaCallback; the run has"
    assert f"Callbacks of {mine}: {added}" in caplog.text


def test_an_override_keeps_the_shipped_checkpoints_unless_emptied(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hft = tmp_path / "hft.yaml"
    hft.write_text(HFT_ONLY)
    kept = PeftCLI(args=["--config", CONFIG, "--config", str(hft)], run=False)
    kinds = [
        type(cb).__name__ for cb in kept.trainer.callbacks if isinstance(cb, (ModelCheckpoint, LISA, HalfFineTuning))
    ]
    assert sorted(kinds) == ["HalfFineTuning", "LISA", "ModelCheckpoint", "ModelCheckpoint"]  # LISA + HFT, as announced
    assert kept.trainer.checkpoint_callbacks[1].monitor == "val/acc"
    emptied = PeftCLI(args=["--config", CONFIG, "--trainer.callbacks=[]", "--config", str(hft)], run=False)
    assert not any(isinstance(cb, LISA) for cb in emptied.trainer.callbacks)
    assert any(isinstance(cb, HalfFineTuning) for cb in emptied.trainer.callbacks)
    assert all(cb.monitor is None for cb in emptied.trainer.checkpoint_callbacks)  # Lightning's default one


def test_a_callback_of_a_class_already_there_replaces_it(tmp_path):
    mine = tmp_path / "lisa4.yaml"
    mine.write_text("trainer:\n  callbacks:\n    - class_path: LISA\n      init_args: {n_layers: 4, interval: 5}\n")
    cli = PeftCLI(args=["--config", CONFIG, "--config", str(mine)], run=False)
    lisa = [cb for cb in cli.trainer.callbacks if isinstance(cb, LISA)]
    assert len(lisa) == 1 and lisa[0].n_layers == 4
    assert len(cli.trainer.checkpoint_callbacks) == 2


def test_combination_rules(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("trainer: {callbacks: [{class_path: ModelCheckpoint}, {class_path: LISA}]}\n")
    second.write_text(
        "trainer: {callbacks: [{class_path: ModelCheckpoint},"
        " {class_path: lightning_peft.callbacks.LISA, init_args: {n_layers: 3}}, EarlyStopping]}\n"
    )
    args, notices = combine_config_callbacks(["fit", "-c", str(first), "-c", str(second), "--trainer.max_steps=1"])
    assert args[:5] == ["fit", "-c", str(first), "-c", str(second)] and args[-1] == "--trainer.max_steps=1"
    assert args[5] == "--trainer.callbacks=[]" and args[6].startswith("--trainer.callbacks=[")
    assert "replaces LISA; adds EarlyStopping" in notices[0]  # the identical ModelCheckpoint is not repeated
    assert combine_config_callbacks(["-c", str(first)]) == (["-c", str(first)], [])
    args, notices = combine_config_callbacks(["-c", str(first), "--trainer.callbacks", "[]", "-c", str(second)])
    assert notices == [] and len(args) == 6  # emptied: the second file's list stands alone
