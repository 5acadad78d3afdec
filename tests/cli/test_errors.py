"""What a person sees when a command or a config is wrong: one message naming the problem and the fix."""

import shutil
import subprocess
from pathlib import Path

import pytest

from lightning_peft.cli import cli_main
from lightning_peft.cli.errors import DEBUG_ENV

CONFIG = str(Path(__file__).parents[2] / "configs" / "vit_digits_lisa.yaml")


def _error(tmp_path, monkeypatch, capsys, yaml_text: str | None, *extra: str) -> tuple[int, str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    args = ["fit", "--config", CONFIG]
    if yaml_text is not None:
        override = tmp_path / "override.yaml"
        override.write_text(yaml_text)
        args += ["--config", str(override)]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*args, *extra, "--trainer.max_steps=1", "--trainer.enable_progress_bar=false"])
    return exit_info.value.code, capsys.readouterr().err


def test_constructor_value_error_is_its_message_and_hint(tmp_path, monkeypatch, capsys):
    code, err = _error(
        tmp_path,
        monkeypatch,
        capsys,
        "trainer:\n  callbacks:\n    - class_path: LISA\n      init_args: {n_layers: 0}\n",
    )
    assert code == 1
    assert "error: `n_layers` must be an integer >= 1" in err and "HINT:" in err and "--debug" in err
    assert "Traceback" not in err and "jsonargparse" not in err


def test_debug_flag_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  callbacks:\n    - class_path: LISA\n      init_args: {n_layers: 0}\n")
    with pytest.raises(ValueError, match="`n_layers` must be an integer >= 1"):
        cli_main(["fit", "--config", CONFIG, "--config", str(bad), "--debug"])


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            "trainer:\n  callbacks:\n    - class_path: LIZA\n",
            "`class_path` 'LIZA' is not a class this CLI knows; did you mean 'LISA'?",
        ),
        ("model:\n  class_path: TextClassifer\n", "did you mean 'TextClassifier'"),
        ("trainer:\n  max_step: 3\n", "Unknown option `trainer.max_step`; did you mean 'trainer.max_steps'"),
        (
            "trainer:\n  callbacks:\n    - class_path: LISA\n      init_args: {n_layer: 2}\n",
            "`n_layer` is not an argument of LISA; did you mean 'n_layers'",
        ),
        (
            "model:\n  init_args:\n    num_clases: 3\n",
            "`num_clases` is not an argument of ImageClassifier; did you mean",
        ),
    ],
    ids=["callback", "module", "option", "callback-argument", "module-argument"],
)
def test_unknown_names_get_suggestions(yaml_text, expected, tmp_path, monkeypatch, capsys):
    code, err = _error(tmp_path, monkeypatch, capsys, yaml_text)
    assert code == 2 and expected in err and "HINT:" in err
    assert "Subtypes:" not in err and "usage:" not in err


def test_unknown_argument_names_the_help_option(tmp_path, monkeypatch, capsys):
    _, err = _error(tmp_path, monkeypatch, capsys, None, "--model.init_args.num_clases=3")
    assert "did you mean 'num_classes'?" in err and "`lightning-peft fit --model.help ImageClassifier`" in err


def test_misspelled_command_line_flag_gets_a_suggestion(tmp_path, monkeypatch, capsys):
    code, err = _error(tmp_path, monkeypatch, capsys, None, "--trainer.max_stpes", "3")
    assert code == 2 and "Unknown option `trainer.max_stpes`; did you mean 'trainer.max_steps'" in err
    assert "usage:" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--trainer.max_steps=abc", "`trainer.max_steps` must be int, got 'abc'."),
        ("--trainer.max_epochs=abc", "`trainer.max_epochs` must be int or None, got 'abc'."),
        ("--model.init_args.num_classes=three", "`model.init_args.num_classes` of ImageClassifier must be int, got"),
    ],
    ids=["plain", "optional", "class-argument"],
)
def test_wrong_type_is_one_message_naming_key_type_and_value(tmp_path, monkeypatch, capsys, flag, expected):
    code, err = _error(tmp_path, monkeypatch, capsys, None, flag)
    assert code == 2 and err.startswith(f"error: {expected}") and "HINT:" in err
    assert "Subtypes:" not in err and "usage:" not in err and len(err.splitlines()) == 1


def test_yaml_syntax_error_names_file_and_line(tmp_path, monkeypatch, capsys):
    code, err = _error(tmp_path, monkeypatch, capsys, "trainer:\n  max_steps: [3\n  foo: 1\n")
    assert code == 2
    assert "override.yaml, line 3, column 6: YAML syntax error" in err and "HINT:" in err


def test_bare_no_in_a_name_list_is_explained(tmp_path, monkeypatch, capsys):
    yaml_text = "model:\n  init_args:\n    peft: {peft_type: LORA, r: 4, target_modules: [qkv, no]}\n"
    code, err = _error(tmp_path, monkeypatch, capsys, yaml_text)
    assert code == 2
    assert "`model.init_args.peft.target_modules` mixes names and booleans" in err and "quote it" in err
    assert "'bool' object has no attribute" not in err


def test_boolean_where_a_string_is_expected(tmp_path, monkeypatch, capsys):
    yaml_text = (
        "data:\n  class_path: TextClassificationFile\n  init_args:\n    train_file: x.csv\n    label_column: no\n"
    )
    code, err = _error(tmp_path, monkeypatch, capsys, yaml_text)
    assert code == 2 and "`label_column` must be a string, got the boolean False" in err and "quote the value" in err


def test_console_script_prints_one_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  callbacks:\n    - class_path: LIZA\n")
    result = subprocess.run(
        [shutil.which("lightning-peft"), "fit", "--config", CONFIG, "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "did you mean 'LISA'?" in result.stderr and "Traceback" not in result.stderr
