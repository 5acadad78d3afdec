"""`lightning-peft estimate` is a command like `fit`: the same configs, overrides and error messages."""

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_peft.cli import cli_main
from lightning_peft.cli.errors import DEBUG_ENV, UserError
from lightning_peft.cli.estimate import estimate_from_config, parse_memory

ROOT = Path(__file__).parents[2]
LLAMA = str(ROOT / "configs" / "llama_text_lisa.yaml")
ONE_LAYER = (
    "{model_type: llama, vocab_size: 257, hidden_size: 64, intermediate_size: 172, num_hidden_layers: 1,"
    " num_attention_heads: 4, num_key_value_heads: 2}"
)


def _exit(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as info:
        cli_main(list(args))
    return info.value.code, capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_estimate_takes_the_overrides_fit_takes(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    cli_main(["estimate", "--config", LLAMA, "--model.init_args.config", ONE_LAYER, "--memory", "1GiB",
              "--methods", "full", "lisa"])  # fmt: skip
    out = capsys.readouterr().out
    assert "Fits in 1.0GiB:" in out and "LISA" in out and "LoRA" not in out
    full = estimate_from_config(["--config", LLAMA], methods=["full"]).row("full")
    one_layer = estimate_from_config(["--config", LLAMA, "--model.init_args.config", ONE_LAYER], methods=["full"])
    assert one_layer.row("full").total_params < full.total_params  # the override reached the model


@pytest.mark.parametrize(
    ("memory", "expected"),
    [
        ("24", "error: `--memory` needs a unit, got '24': a bare number would be 24 bytes. HINT: write --memory 24GiB"),
        ("24 parsecs", "error: `--memory` must be a size such as '24GiB', '80GB' or '512MiB', got '24 parsecs'."),
    ],
)
def test_memory_needs_a_unit_and_a_bad_size_is_one_message(capsys, monkeypatch, memory, expected):
    code, err = _exit(capsys, monkeypatch, "estimate", "--config", LLAMA, "--memory", memory)
    assert code == 2
    assert err.startswith(expected) and "HINT:" in err and "Traceback" not in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="needs a unit"):
        parse_memory("80")
    assert parse_memory("1KiB") == 1024


def test_estimate_errors_are_handled_as_for_fit(capsys, monkeypatch):
    code, err = _exit(capsys, monkeypatch, "estimate", "--config", LLAMA, "--memroy", "24GiB")
    assert code == 2 and "Unknown option `memroy`; did you mean 'memory'?" in err and "usage:" not in err
    code, err = _exit(capsys, monkeypatch, "estimate", "--config", LLAMA, "--device", "tpu")
    assert code == 2 and "invalid choice: 'tpu'" in err and "HINT:" in err and "usage:" not in err


def test_a_misspelled_command_gets_a_suggestion(capsys, monkeypatch):
    code, err = _exit(capsys, monkeypatch, "exprot")
    assert code == 2 and "Unknown command `exprot`; did you mean 'export'?" in err
    assert "fit, validate, test, predict, export, estimate" in err


def test_top_level_help_lists_export_and_estimate(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-peft"])
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "export", "estimate"):
        assert f"\n    {command} " in out, out
    cli_main(["estimate", "--help"])
    out = capsys.readouterr().out
    assert "--memory" in out and "--batch_size" in out and "Every option of `lightning-peft fit`" in out


def test_the_library_estimator_does_not_import_the_command_line():
    code = "import sys, lightning_peft.estimate; print(sorted(m for m in sys.modules if 'lightning_peft.cli' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
