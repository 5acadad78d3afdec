"""A pruned checkpoint loads into a fresh, unpruned module: load_from_checkpoint, ckpt_path= and the CLI."""

import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft.callbacks import EarlyPruning
from lightning_peft.cli import PeftCLI
from lightning_peft.data import Digits
from lightning_peft.modules import ImageClassifier
from lightning_peft.pruning import restore_pruned_architecture

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = dict(
    model_name="vit_tiny_patch16_224",
    num_classes=10,
    model_kwargs={"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 4},
    peft={"peft_type": "LORA", "r": 4, "target_modules": ["qkv", "fc1", "fc2"]},
)


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """A fit that prunes after 2 of 6 steps; the module, a batch of images, its logits, the last checkpoint."""
    folder = tmp_path_factory.mktemp("pruned")
    torch.set_num_threads(1)
    pl.seed_everything(0)
    module = ImageClassifier(**ARGS)
    checkpoint = ModelCheckpoint(dirpath=folder, save_last=True)
    trainer = pl.Trainer(
        **trainer_kwargs(folder, enable_checkpointing=True, max_steps=6, limit_val_batches=2),
        callbacks=[EarlyPruning(estimation_steps=2, plot=False), checkpoint],
    )
    data = Digits(image_size=16, batch_size=8)
    trainer.fit(module, data)
    images = next(iter(data.val_dataloader()))[0]
    module.eval()
    with torch.no_grad():
        logits = module(images)
    assert module.model.base_model.model.blocks[0].attn.num_heads < 4, "the run pruned heads"
    return module, images, logits, folder / "last.ckpt"


def test_load_from_checkpoint_rebuilds_the_pruned_model(pruned_run):
    module, images, logits, path = pruned_run
    loaded = ImageClassifier.load_from_checkpoint(path, weights_only=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), logits)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in module.parameters())


def test_trainer_predict_and_validate_with_ckpt_path(pruned_run, tmp_path):
    module, images, logits, path = pruned_run
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, limit_val_batches=2))
    loader = DataLoader(TensorDataset(images), batch_size=len(images))
    (predicted,) = trainer.predict(ImageClassifier(**ARGS), loader, ckpt_path=path, weights_only=True)
    assert torch.equal(predicted, logits)
    expected = trainer.validate(module, Digits(image_size=16, batch_size=8))[0]
    assert trainer.validate(ImageClassifier(**ARGS), Digits(image_size=16, batch_size=8), ckpt_path=path)[0] == expected


def test_the_helper_in_any_lightning_module(pruned_run):
    module, images, logits, path = pruned_run

    class Plain(pl.LightningModule):  # holds the same network, without the ready modules' hook
        def __init__(self):
            super().__init__()
            self.model = ImageClassifier(**ARGS).model

    checkpoint = torch.load(path, weights_only=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        Plain().load_state_dict(checkpoint["state_dict"])
    plain = Plain()
    assert restore_pruned_architecture(plain, checkpoint)
    assert not restore_pruned_architecture(plain, checkpoint), "a second call finds the shapes already right"
    plain.load_state_dict(checkpoint["state_dict"])
    with torch.no_grad():
        assert torch.equal(plain.model.eval()(images), logits)


CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_epochs: 1
  limit_train_batches: 6
  limit_val_batches: 2
  num_sanity_val_steps: 0
  enable_progress_bar: false
  logger: false
  callbacks:
    - class_path: ModelCheckpoint
      init_args: {save_last: true}
    - class_path: EarlyPruning
      init_args: {estimation_steps: 2, plot: false}
model:
  class_path: ImageClassifier
  init_args:
    model_name: vit_tiny_patch16_224
    num_classes: 10
    model_kwargs: {img_size: 16, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 4}
    peft: {peft_type: LORA, r: 4, target_modules: [qkv, fc1, fc2]}
data:
  class_path: Digits
  init_args: {image_size: 16, batch_size: 8}
"""


def test_cli_validate_and_predict_use_a_pruned_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pruned.yaml").write_text(CONFIG)
    fit = PeftCLI(args=["fit", "--config", "pruned.yaml"])
    accuracy = float(fit.trainer.callback_metrics["val/acc"])
    ckpt = str(tmp_path / "checkpoints" / "last.ckpt")
    validate = PeftCLI(args=["validate", "--config", "pruned.yaml", "--ckpt_path", ckpt])
    assert float(validate.trainer.callback_metrics["val/acc"]) == accuracy
    predict = PeftCLI(args=["predict", "--config", "pruned.yaml", "--ckpt_path", ckpt, "--return_predictions=true"])
    assert predict.trainer.predict_loop.predictions, "predict ran on the pruned model"
