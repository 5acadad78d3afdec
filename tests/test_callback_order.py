"""Correctness never depends on the order of ``trainer.callbacks``: every order gives bit-identical training."""

import itertools

import lightning.pytorch as pl
import pytest
import torch
from helpers import ConvStack, trainer_kwargs
from pruning_helpers import PruneModule

from lightning_peft.callbacks import IST, LISA, ActivationQuantization, EarlyPruning, HalfFineTuning

pytestmark = pytest.mark.usefixtures("one_thread")


def _callbacks():
    return {
        "IST": IST(update_ratio=0.5, interval=2, seed=3, plot=False),
        "LISA": LISA(n_layers=1, interval=3, seed=1, plot=False),
        "HalfFineTuning": HalfFineTuning(seed=2),
        "EarlyPruning": EarlyPruning(estimation_steps=3, seed=4, plot=False),
        "ActivationQuantization": ActivationQuantization(min_numel=64),
    }


def _train(order, tmp_path):
    torch.manual_seed(0)
    module = PruneModule("timm", lora=True)
    module.net.base_model.model.head.requires_grad_(True)  # something trains whichever blocks LISA and IST draw
    callbacks = _callbacks()
    trainer = pl.Trainer(callbacks=[callbacks[name] for name in order], max_steps=6, **trainer_kwargs(tmp_path))
    trainer.fit(module)
    return {name: p.detach().clone() for name, p in module.named_parameters()}, callbacks


ORDERS = [
    ("IST", "LISA", "HalfFineTuning", "EarlyPruning", "ActivationQuantization"),
    ("ActivationQuantization", "EarlyPruning", "HalfFineTuning", "LISA", "IST"),
    ("LISA", "ActivationQuantization", "IST", "EarlyPruning", "HalfFineTuning"),
]


def test_shuffled_method_callbacks_train_bit_identically(tmp_path):
    reference, callbacks = _train(ORDERS[0], tmp_path / "0")
    assert callbacks["EarlyPruning"].pruned and callbacks["IST"].scores is not None
    assert len(callbacks["IST"].history) > 1  # the importance update ran (it needs the step boundary first)
    for index, order in enumerate(ORDERS[1:], start=1):
        weights, _ = _train(order, tmp_path / str(index))
        assert weights.keys() == reference.keys()
        different = [name for name in reference if not torch.equal(weights[name], reference[name])]
        assert not different, (order, different[:3])


def test_orders_cover_every_method_first_and_last():
    assert {order[0] for order in ORDERS} | {order[-1] for order in ORDERS} >= {"IST", "LISA", "ActivationQuantization"}
    assert all(sorted(order) == sorted(ORDERS[0]) for order in ORDERS)
    assert len(set(ORDERS)) == len(ORDERS) and len(list(itertools.permutations(ORDERS[0]))) == 120


def _channel_callbacks():
    return {
        "LISA": LISA(n_layers=2, interval=2, seed=1, plot=False),
        "HalfFineTuning": HalfFineTuning(reselect_every_n_epochs=1, seed=2),  # blocks of one layer: channel halves
        "ActivationQuantization": ActivationQuantization(min_numel=64),
    }


CHANNEL_ORDERS = [
    ("LISA", "HalfFineTuning", "ActivationQuantization"),
    ("ActivationQuantization", "HalfFineTuning", "LISA"),
    ("HalfFineTuning", "ActivationQuantization", "LISA"),
]


def _train_channels(order, tmp_path):
    torch.manual_seed(0)
    module = ConvStack()
    callbacks = _channel_callbacks()
    trainer = pl.Trainer(callbacks=[callbacks[name] for name in order], max_epochs=3, **trainer_kwargs(tmp_path))
    trainer.fit(module)
    return {name: p.detach().clone() for name, p in module.named_parameters()}, callbacks


def test_shuffled_callbacks_with_channel_halves_train_bit_identically(tmp_path):
    reference, callbacks = _train_channels(CHANNEL_ORDERS[0], tmp_path / "0")
    assert callbacks["HalfFineTuning"].plan().channels and len(callbacks["HalfFineTuning"].history) == 3
    assert callbacks["ActivationQuantization"].last_stats.num_quantized > 0
    for index, order in enumerate(CHANNEL_ORDERS[1:], start=1):
        weights, _ = _train_channels(order, tmp_path / str(index))
        different = [name for name in reference if not torch.equal(weights[name], reference[name])]
        assert not different, (order, different[:3])
