"""Every config in configs/ builds, the console script runs, and the quickstart meets its bar."""

import re
import shutil
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import pytest
from helpers import run_config
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft.callbacks import LISA
from lightning_peft.cli import PeftCLI, cli_main

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "vit_digits_lisa.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_and_builds(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = PeftCLI(args=["--config", str(config)], run=False)
    assert isinstance(cli.model, pl.LightningModule)
    assert isinstance(cli.datamodule, pl.LightningDataModule)
    text = config.read_text()
    assert text.startswith("#"), "a config starts with a header comment"
    assert "lightning-peft fit --config configs/" + config.name in text, "the header gives the exact command"
    if "class_path: LISA" in text:
        assert any(isinstance(cb, LISA) for cb in cli.trainer.callbacks)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_keeps_the_last_and_the_best_checkpoint_in_the_run_folder(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = PeftCLI(args=["--config", str(config)], run=False)
    checkpoints = [cb for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    assert checkpoints, f"{config.name} keeps no checkpoint"
    assert all(cb.dirpath is None for cb in checkpoints), "checkpoints go to the run's folder (<log dir>/checkpoints)"
    assert any(cb.save_last and cb._every_n_train_steps > 0 for cb in checkpoints), "last.ckpt within an epoch too"
    best = [cb for cb in checkpoints if cb.monitor is not None and cb.save_top_k >= 1]
    assert best and best[0].monitor.startswith("val/"), "the best checkpoint by a validation metric"
    assert best[0].mode == ("min" if best[0].monitor.endswith(("loss", "ppl")) else "max")
    # the metric the config's module logs: perplexity for language models, accuracy for classifiers
    expected = "val/ppl" if type(cli.model).__name__ == "CausalLM" else "val/acc"
    assert best[0].monitor == expected, f"{config.name} monitors {best[0].monitor}, its module logs {expected}"


def test_configs_readme_tables_every_config():
    readme = (Path(__file__).parents[2] / "configs" / "README.md").read_text()
    for config in CONFIGS:
        assert f"`{config.name}`" in readme, f"configs/README.md has no row for {config.name}"


def test_config_typo_fails_with_the_argument_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  callbacks:\n    - class_path: LISA\n      init_args: {n_layers: 0}\n")
    with pytest.raises(SystemExit):
        PeftCLI(args=["--config", str(bad)], run=False)


def test_cli_fit_runs_a_few_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[2] / "configs" / "vit_digits_lisa.yaml"
    cli = PeftCLI(
        args=[
            "fit",
            "--config",
            str(config),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert cli.trainer.global_step == 3
    assert re.search(r"Final validation metrics after 3 steps: .*val/acc=", capsys.readouterr().out)


def test_console_script_is_installed():
    exe = shutil.which("lightning-peft")
    assert exe is not None, "pip install -e . installs the `lightning-peft` command"
    result = subprocess.run([exe, "fit", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--config" in result.stdout


def test_cli_main_returns_nothing_for_the_console_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[2] / "configs" / "vit_digits_lisa.yaml"
    args = ["fit", "--config", str(config), "--trainer.max_steps=1", "--trainer.limit_val_batches=1"]
    assert cli_main([*args, "--trainer.enable_progress_bar=false"]) is None  # sys.exit(None) -> status 0


def _final_accuracy(config_name: str, workdir: Path) -> float:
    """Run `lightning-peft fit --config configs/<config_name>` as a user does; return its printed val/acc."""
    return run_config(config_name, workdir)[1]["val/acc"]


@pytest.fixture(scope="module")
def quickstart_accuracy(tmp_path_factory):
    return _final_accuracy("quickstart.yaml", tmp_path_factory.mktemp("quickstart"))


@pytest.mark.slow
def test_quickstart_reaches_its_accuracy(quickstart_accuracy):
    """The README's main command: exit status 0 and validation accuracy >= 0.65 (majority class: 0.42)."""
    assert quickstart_accuracy >= 0.65


@pytest.mark.slow
def test_int8_activations_keep_the_quickstart_accuracy(quickstart_accuracy, tmp_path):
    """Same seed, data and steps with activations saved in int8: within 1 point of the unquantized run."""
    assert abs(_final_accuracy("minilm_tweets_lisa_int8act.yaml", tmp_path) - quickstart_accuracy) <= 0.01
