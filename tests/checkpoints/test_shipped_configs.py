"""Each shipped config, run briefly from the CLI, leaves checkpoints that `validate --ckpt_path`,
`load_from_checkpoint` and `export` use (pruned ones included; export refuses what its format cannot state).

`fit` runs as the console script in a fresh process, as a user runs it; `validate` and `export` run the same
command line (`cli_main`) in this process, which saves two interpreter starts per config (the console script itself
is tested in tests/cli/test_configs.py).
"""

from pathlib import Path

import pytest
import torch
from helpers import CONFIGS_DIR, run_config

from lightning_peft.cli import PeftCLI, cli_main

# every config but FSDP2's (two processes; its resume is tested in tests/test_model_parallel.py) and those for the
# user's own files (no data ships for them: tests/cli/test_own_data_configs.py runs them on generated files)
OWN_DATA = ("image_folder_vit_lisa.yaml", "audio_folder_ast_lisa.yaml", "csv_text_classifier_lisa.yaml")
CONFIGS = sorted(p.name for p in CONFIGS_DIR.glob("*.yaml") if "fsdp2" not in p.name and p.name not in OWN_DATA)
# EarlyPruning estimates for 50 steps: the short run must go past them to write a pruned checkpoint
STEPS = {"minilm_tweets_lora_early_pruning.yaml": 52}
# what `export` refuses, and why: BERT heads pruned; the timm AST recipe; this package's bottleneck adapters
EXPORT_REFUSED = {
    "minilm_tweets_lora_early_pruning.yaml": "cannot state this model's sizes",
    "ast_keywords_lisa.yaml": "AST recipe",
    "ast_keywords_hft.yaml": "AST recipe",
    "vit_digits_ist_adapters.yaml": "adapters of lightning_peft",
}
EXTRA = {"llama_text_lisa.yaml": ["--trainer.val_check_interval=1.0"]}  # it validates every 100 steps


def _command_line(args: list[str], capsys) -> tuple[int, str, str]:
    """``lightning-peft ARGS`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    message = ""
    try:
        cli_main(args)
        status = 0
    except SystemExit as exit:  # `sys.exit("text")` prints the text to stderr when the interpreter exits
        status, message = (exit.code, "") if isinstance(exit.code, int) else (1, f"{exit.code}\n")
    captured = capsys.readouterr()
    return status, captured.out, captured.err + message


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_a_short_run_leaves_checkpoints_that_validate_and_load(config, tmp_path, monkeypatch, capsys):
    steps = STEPS.get(config, 2)
    overrides = ["--trainer.max_epochs=1", f"--trainer.limit_train_batches={steps}", "--trainer.limit_val_batches=2"]
    overrides += ["--trainer.max_steps=-1", "--trainer.logger.init_args.save_dir=logs", *EXTRA.get(config, [])]
    _, metrics = run_config(config, tmp_path, *overrides)
    folders = list((tmp_path / "logs").glob("*/version_0/checkpoints"))
    assert len(folders) == 1
    last, best = folders[0] / "last.ckpt", next(folders[0].glob("best-step=*.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == steps
    assert torch.load(best, weights_only=True)["global_step"] == steps
    name = next(k for k in metrics if k in ("val/acc", "val/ppl"))

    monkeypatch.chdir(tmp_path)
    command = ["validate", "--config", str(CONFIGS_DIR / config), "--ckpt_path", str(last)]
    status, out, err = _command_line([*command, "--trainer.limit_val_batches=2", "--trainer.logger=false"], capsys)
    assert status == 0, err[-3000:]
    assert name in out

    cli = PeftCLI(args=["--config", str(CONFIGS_DIR / config), "--trainer.logger=false"], run=False)
    loaded = type(cli.model).load_from_checkpoint(last, weights_only=True)
    checkpoint = torch.load(last, weights_only=True)
    own = loaded.state_dict()
    assert all(torch.equal(own[k], v) for k, v in checkpoint["state_dict"].items())
    if "pruning" in config:
        assert checkpoint["pruning_plan"]["heads"]
        assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in cli.model.parameters())

    status, out, err = _command_line(["export", "--ckpt_path", str(last), "--output", str(tmp_path / "out")], capsys)
    if config in EXPORT_REFUSED:
        assert status != 0 and EXPORT_REFUSED[config] in err and "HINT" in err
        assert not (tmp_path / "out").exists()
    else:
        assert status == 0, err[-3000:]
        assert list((tmp_path / "out").glob("*.safetensors")), "the model is in safetensors"


def test_the_list_covers_the_configs():
    assert "minilm_tweets_lora_early_pruning.yaml" in CONFIGS and Path(CONFIGS_DIR / CONFIGS[0]).is_file()
