import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import changed, snapshot, trainer_kwargs
from torch.utils.data import DataLoader

from lightning_peft.callbacks import LISA
from lightning_peft.data import TextFiles
from lightning_peft.layers import find_layers
from lightning_peft.modules import CausalLM

LLAMA = {
    "model_type": "llama",
    "vocab_size": 257,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _loader(n: int = 8) -> DataLoader:
    ids = torch.randint(0, 257, (n, 32), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids], 4)


def test_lisa_trains_only_the_sampled_layers_of_a_llama(tmp_path):
    pl.seed_everything(0)
    module = CausalLM(config=LLAMA)
    stack = find_layers(module)
    assert stack.path == "model.model.layers" and len(stack) == 4
    before = snapshot(module)
    lisa = LISA(n_layers=2, interval=100)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[lisa]))
    trainer.fit(module, train_dataloaders=_loader())
    updated = changed(before, module)
    assert {stack.block_of(name) for name in updated} - {None} == set(lisa.sampled)
    assert {"model.model.embed_tokens.weight", "model.lm_head.weight", "model.model.norm.weight"} <= updated


def test_validation_logs_perplexity_of_the_token_weighted_loss(tmp_path):
    module = CausalLM(config=LLAMA)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=1))
    loader = _loader()
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    module.eval()
    with torch.no_grad():
        losses = [module.compute_loss(batch) for batch in loader]
    expected = math.exp(sum(float(loss) for loss in losses) / len(losses))  # equal-sized batches
    assert float(trainer.callback_metrics["val/ppl"]) == pytest.approx(expected, rel=1e-4)
    assert 100 < expected < 1000  # near-uniform over 257 tokens at the start


def test_loss_falls_on_packed_text(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text("the cat sat on the mat. " * 40)
    data = TextFiles(str(tmp_path / "*.txt"), block_size=32, batch_size=8, val_fraction=0.25)
    module = CausalLM(config=LLAMA, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, limit_val_batches=2))
    trainer.fit(module, datamodule=data)
    assert float(trainer.callback_metrics["val/ppl"]) < 20  # from ~257: the repeated sentence is learned


def test_from_a_saved_folder_and_with_lora(tmp_path):
    CausalLM(config=LLAMA).model.save_pretrained(tmp_path / "llama")
    module = CausalLM(str(tmp_path / "llama"), peft={"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]})
    assert module.model.training
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert module(torch.randint(0, 257, (1, 8))).shape == (1, 8, 257)


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="exactly one of `model`"):
        CausalLM()
    with pytest.raises(ValueError, match="`config` does not describe"):
        CausalLM(config={"model_type": "not-a-model"})
    with pytest.raises(FileNotFoundError, match=r"looks like a local folder, but .*missing' does not exist"):
        CausalLM(str(tmp_path / "missing"))
