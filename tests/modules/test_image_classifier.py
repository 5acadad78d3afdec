import doctest
import functools

import lightning.pytorch as pl
import peft
import pytest
import timm
import torch
from helpers import trainer_kwargs
from torch.utils.data import DataLoader, TensorDataset

import lightning_peft.modules.image_classifier as image_module
from lightning_peft.modules import ImageClassifier

TINY_VIT = {"model_name": "vit_tiny_patch16_224", "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}
LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["qkv"]}


def make_trainer(tmp_path, max_steps, **kwargs):
    return pl.Trainer(**trainer_kwargs(tmp_path, max_steps=max_steps, **kwargs))


def fixed_images(n=64, num_classes=4):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % num_classes
    # Each class has its own brightness so that a few steps can fit it.
    images = torch.randn(n, 3, 32, 32, generator=generator) * 0.1 + labels.view(-1, 1, 1, 1).float()
    return TensorDataset(images, labels)


def loss_on(module, dataset):
    module.eval()
    images, labels = dataset.tensors
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(module(images), labels).item()
    module.train()
    return loss


def test_full_fine_tuning_lowers_the_loss(tmp_path):
    pl.seed_everything(0)
    module = ImageClassifier(num_classes=4, **TINY_VIT)
    data = fixed_images()
    before = loss_on(module, data)
    trainer = make_trainer(tmp_path, max_steps=15)
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=True))
    assert loss_on(module, data) < 0.8 * before
    assert "train/loss" in trainer.callback_metrics and "train/acc" in trainer.callback_metrics


def test_lora_from_a_dict_trains_only_adapters_and_head(tmp_path):
    pl.seed_everything(0)
    module = ImageClassifier(num_classes=4, peft=LORA, **TINY_VIT)
    assert isinstance(module.model, peft.PeftModel)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".head.modules_to_save." in n for n in trainable)
    assert any(".head.modules_to_save." in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    make_trainer(tmp_path, max_steps=5).fit(module, DataLoader(fixed_images(), batch_size=8))
    params = dict(module.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in frozen_before.items())
    changed = {n for n, value in trainable_before.items() if not torch.equal(params[n], value)}
    assert any("lora_B" in n for n in changed) and any(".head.modules_to_save." in n for n in changed)


def test_a_peft_config_object_is_accepted_and_left_unchanged():
    config = peft.LoraConfig(r=2, target_modules=["qkv"])
    module = ImageClassifier(num_classes=3, peft=config, **TINY_VIT)
    assert config.modules_to_save is None
    assert module.model.peft_config["default"].modules_to_save == ["head"]


def test_explicit_modules_to_save_are_kept():
    module = ImageClassifier(num_classes=3, peft={**LORA, "modules_to_save": ["head", "norm"]}, **TINY_VIT)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert any(".norm.modules_to_save." in n for n in trainable)


def test_optimizer_covers_every_trainable_parameter_and_scheduler_steps_per_step(tmp_path):
    module = ImageClassifier(
        num_classes=4,
        peft=LORA,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        **TINY_VIT,
    )
    config = module.configure_optimizers()
    in_optimizer = {id(p) for group in config["optimizer"].param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.parameters() if p.requires_grad}
    assert config["lr_scheduler"]["interval"] == "step"

    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.fit(module, DataLoader(fixed_images(), batch_size=8))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_reduce_on_plateau_is_stepped_per_epoch_on_val_loss():
    module = ImageClassifier(num_classes=4, scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau, **TINY_VIT)
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "epoch" and config["lr_scheduler"]["monitor"] == "val/loss"


def test_validation_and_test_log_accuracy(tmp_path):
    module = ImageClassifier(num_classes=4, **TINY_VIT)
    loader = DataLoader(fixed_images(), batch_size=8)
    trainer = make_trainer(tmp_path, max_steps=1)
    (val,) = trainer.validate(module, loader, verbose=False)
    (test,) = trainer.test(module, loader, verbose=False)
    assert {"val/loss", "val/acc"} <= set(val) and 0.0 <= val["val/acc"] <= 1.0
    assert "test/acc" in test and test["test/acc"] == pytest.approx(val["val/acc"])


def test_lightning_cli_builds_the_optimizer_from_yaml_style_config(monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["lightning-peft"])

    args = {
        "model": {
            "num_classes": 4,
            **TINY_VIT,
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}},
            "scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 10}},
        },
        "trainer": {"logger": False, "enable_progress_bar": False},
    }
    cli = LightningCLI(ImageClassifier, run=False, args=args, save_config_callback=None)
    config = cli.model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD) and config["optimizer"].defaults["lr"] == 0.05
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)


def test_checkpoint_with_another_head_loads_without_the_head(tmp_path):
    source = timm.create_model(num_classes=5, **TINY_VIT["model_kwargs"], model_name=TINY_VIT["model_name"])
    path = tmp_path / "source.pth"
    torch.save(source.state_dict(), path)
    with pytest.warns(UserWarning, match=r"head\.weight \(4, 192\), head\.bias \(4,\)"):
        module = ImageClassifier(num_classes=4, checkpoint_path=str(path), **TINY_VIT)
    assert torch.equal(module.model.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert torch.equal(module.model.cls_token, source.cls_token)
    assert module.model.head.weight.shape == (4, 192)


def test_checkpoint_with_the_same_head_loads_everything_silently(tmp_path, recwarn):
    source = timm.create_model(num_classes=4, **TINY_VIT["model_kwargs"], model_name=TINY_VIT["model_name"])
    path = tmp_path / "source.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    module = ImageClassifier(num_classes=4, checkpoint_path=str(path), **TINY_VIT)
    assert torch.equal(module.model.head.weight, source.head.weight)
    assert not [w for w in recwarn if "Dropped" in str(w.message)]


def test_checkpoint_of_another_architecture_is_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="has no weight named like the model's"):
        ImageClassifier(num_classes=4, checkpoint_path=str(path), **TINY_VIT)


def test_lightning_checkpoint_restores_a_lora_module(tmp_path):
    module = ImageClassifier(num_classes=4, peft=LORA, **TINY_VIT)
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(module, DataLoader(fixed_images(), batch_size=8))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "last.ckpt")
    images = fixed_images().tensors[0][:4]
    module.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.allclose(module(images), restored(images))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model_name": "vit_tiny_patch16_2244"}, ValueError, "`model_name` must be a timm architecture"),
        ({"num_classes": 1}, ValueError, "`num_classes` must be an integer >= 2"),
        ({"pretrained": True, "checkpoint_path": "x.pth"}, ValueError, "exclude each other"),
        ({"checkpoint_path": "/no/such/file.pth"}, FileNotFoundError, "`checkpoint_path` must be an existing file"),
        ({"model_kwargs": {"num_classes": 3}}, ValueError, "`model_kwargs` must not repeat"),
        ({"peft": {"r": 8}}, ValueError, "`peft_type` key"),
        ({"peft": {"peft_type": "NOPE"}}, ValueError, "`peft.peft_type` must be one of"),
        ({"peft": {"peft_type": "LORA", "rank": 8}}, ValueError, "`peft` is not a valid LoraConfig"),
        ({"peft": ["LORA"]}, TypeError, "`peft` must be a dict"),
        ({"peft": {"peft_type": "LORA"}}, ValueError, "set `target_modules`.*'qkv'"),
        ({"optimizer": "adam"}, TypeError, "`optimizer` must be a callable"),
    ],
)
def test_misconfiguration_is_rejected(kwargs, error, match):
    arguments = {"num_classes": 4, **TINY_VIT, **kwargs}
    with pytest.raises(error, match=match) as info:
        ImageClassifier(**arguments)
    assert "HINT:" in str(info.value)


def test_docstring_example_runs():
    assert doctest.testmod(image_module).failed == 0
