"""What a CLI run writes: the resolved config only in the run's own folder, never over a file the user wrote."""

import shutil
from pathlib import Path

import pytest

from lightning_peft.cli import PeftCLI

CONFIG = Path(__file__).parents[2] / "configs" / "vit_digits_lisa.yaml"
QUICK = ["--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]


def test_a_users_config_is_untouched_by_a_run_without_logger(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    users = tmp_path / "config.yaml"
    shutil.copy(CONFIG, users)
    before = users.read_bytes()
    PeftCLI(args=["fit", "--config", "config.yaml", "--trainer.logger=false", "--seed_everything=7", *QUICK])
    assert users.read_bytes() == before
    saved = tmp_path / "checkpoints" / "config.yaml"  # the run's folder without a logger: its checkpoints
    assert saved.is_file() and "seed_everything: 7" in saved.read_text()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_the_resolved_config_goes_to_the_log_folder_and_is_replaced_only_when_written_by_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIG), "--trainer.logger.init_args.version=fixed", *QUICK]
    PeftCLI(args=args)
    saved = tmp_path / "lightning_logs" / "vit_digits_lisa" / "fixed" / "config.yaml"
    assert saved.read_text().startswith("# lightning-peft:")
    PeftCLI(args=[*args, "--seed_everything=3"])  # our own file from the earlier run in the same folder: replaced
    assert "seed_everything: 3" in saved.read_text()
    saved.write_text("# my notes\n")
    with pytest.raises(RuntimeError, match=r"was not written by lightning-peft.*HINT"):
        PeftCLI(args=args)
    assert saved.read_text() == "# my notes\n"
