"""Everything this package puts into a checkpoint loads with ``torch.load(weights_only=True)``; nothing unpickles."""

import pickle

import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft.callbacks import IST, LISA, ActivationQuantization, EarlyPruning, HalfFineTuning
from lightning_peft.data import Digits
from lightning_peft.modules import ImageClassifier
from lightning_peft.trainable import _names_with_optimizer_state

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def _fit(tmp_path, callbacks, peft=None):
    pl.seed_everything(0)
    module = ImageClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=VIT, peft=peft)
    data = Digits(image_size=16, batch_size=8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, enable_checkpointing=True, max_steps=6, limit_val_batches=1),
        callbacks=[*callbacks, checkpoint],
    )
    trainer.fit(module, data)
    return tmp_path / "last.ckpt"


def test_checkpoints_of_every_method_load_as_plain_data(tmp_path):
    path = _fit(tmp_path / "a", [LISA(n_layers=1, interval=2), HalfFineTuning(), ActivationQuantization()])
    checkpoint = torch.load(path, weights_only=True)
    assert {"LISA", "HalfFineTuning"} <= {key.split("{")[0] for key in checkpoint["callbacks"]}
    assert "trainable_set" in checkpoint

    lora = {"peft_type": "LORA", "r": 4, "target_modules": ["qkv", "fc1"]}
    methods = [IST(update_ratio=0.5, interval=2, plot=False), EarlyPruning(estimation_steps=2, plot=False)]
    path = _fit(tmp_path / "b", methods, lora)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["pruning_plan"]["heads"]
    # ... and Lightning resumes from it with weights_only=True
    module = ImageClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=VIT, peft=lora)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path / "c", max_steps=8, limit_val_batches=1),
        callbacks=[IST(update_ratio=0.5, interval=2, plot=False), EarlyPruning(estimation_steps=2, plot=False)],
    )
    trainer.fit(module, Digits(image_size=16, batch_size=8), ckpt_path=path, weights_only=True)
    assert trainer.global_step == 8


class _Trap:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('TRAPPED').touch()",))


def test_the_fsdp2_metadata_is_never_unpickled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dist").mkdir()
    torch.save({"trainable_set": {"with_optimizer_state": ["w"]}, "evil": _Trap()}, tmp_path / "dist" / "meta.pt")
    with pytest.raises(pickle.UnpicklingError):
        _names_with_optimizer_state(tmp_path / "dist")
    assert not (tmp_path / "TRAPPED").exists()
    torch.save({"trainable_set": {"with_optimizer_state": ["w"]}}, tmp_path / "dist" / "meta.pt")
    assert _names_with_optimizer_state(tmp_path / "dist") == {"w"}
