import lightning.pytorch as pl
import pytest
import torch
from helpers import changed, run_config, snapshot, trainer_kwargs
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft.callbacks import LISA
from lightning_peft.layout import find_blocks
from lightning_peft.modules import AudioClassifier

TIMM_TINY = {"depth": 4, "embed_dim": 32, "num_heads": 2}
HF_TINY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64}


def _module(builder: str, **kwargs) -> AudioClassifier:
    if builder == "timm":
        return AudioClassifier(3, "vit_tiny_patch16_224", target_length=48, model_kwargs=TIMM_TINY, **kwargs)
    return AudioClassifier(3, None, builder="hf", target_length=48, model_kwargs=HF_TINY, **kwargs)


def _loader(n: int = 12) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 48, 128, generator=g), torch.randint(0, 3, (n,), generator=g)), 4)


@pytest.mark.parametrize("builder", ["timm", "hf"])
def test_lisa_trains_only_the_sampled_blocks_and_the_outside(builder, tmp_path):
    pl.seed_everything(0)
    module = _module(builder)
    stack = find_blocks(module)
    before = snapshot(module)
    lisa = LISA(n_layers=1, interval=100)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[lisa]))
    trainer.fit(module, train_dataloaders=_loader())
    updated = changed(before, module)
    blocks = {stack.block_of(name) for name in updated} - {None}
    assert blocks == set(lisa.sampled) and len(blocks) == 1
    assert set(stack.block_parameter_names(lisa.sampled[0])) <= updated
    head = "model.head.1.weight" if builder == "timm" else "model.classifier.dense.weight"
    assert head in updated and any("pos" in n or "position" in n for n in updated)
    assert all(p.requires_grad for p in module.parameters())  # the controller restores requires_grad at the end


@pytest.mark.parametrize("builder", ["timm", "hf"])
def test_fit_validate_and_test_log_accuracy(builder, tmp_path):
    module = _module(builder)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1))
    trainer.fit(module, train_dataloaders=_loader(), val_dataloaders=_loader(4))
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0
    trainer.test(module, dataloaders=_loader(4), verbose=False)
    assert "test/acc" in trainer.callback_metrics


def test_lora_keeps_the_head_trainable():
    module = _module("timm", peft={"peft_type": "LORA", "r": 2, "target_modules": ["qkv"]})
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("head" in n for n in trainable)
    assert not any(n.endswith("blocks.0.mlp.fc1.weight") for n in trainable)
    assert module(torch.randn(2, 48, 128)).shape == (2, 3)


def test_hf_builder_from_a_saved_folder(tmp_path):
    source = _module("hf")
    source.model.save_pretrained(tmp_path / "ast")
    module = AudioClassifier(5, str(tmp_path / "ast"), builder="hf", target_length=48)
    assert module(torch.randn(1, 48, 128)).shape == (1, 5)
    torch.testing.assert_close(
        module.model.audio_spectrogram_transformer.layers[0].attention.q_proj.weight,
        source.model.audio_spectrogram_transformer.layers[0].attention.q_proj.weight,
    )


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="`builder` must be one of"):
        AudioClassifier(3, "vit_tiny_patch16_224", builder="torchaudio")
    with pytest.raises(ValueError, match="`num_classes` must be an integer >= 2"):
        AudioClassifier(1, "vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="arguments of the timm builder"):
        AudioClassifier(3, None, builder="hf", pretrained=True)


@pytest.mark.slow
@pytest.mark.espeak
def test_ast_keywords_config_learns_through_the_cli(tmp_path):
    """The AST config as a user runs it (about a minute): far above chance (0.10) on unseen voices."""
    steps, metrics = run_config("ast_keywords_lisa.yaml", tmp_path, f"--data.init_args.cache_dir={tmp_path / 'cache'}")
    assert steps == 15 * 34  # 15 epochs of 1,080 training clips in batches of 32
    assert metrics["val/acc"] >= 0.7  # 0.872 measured
