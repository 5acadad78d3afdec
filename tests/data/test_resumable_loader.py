"""The training loader carries its position: a run stopped mid-epoch and resumed sees the batches of an
uninterrupted run, and the final weights are the same bit for bit."""

import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer_kwargs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_peft.data import Digits
from lightning_peft.data._loader import ResumableLoader, ResumableSampler
from lightning_peft.modules import ImageClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_order_is_a_seeded_dataloaders_epoch_after_epoch():
    data = list(range(23))
    plain = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5))
    ours = ResumableLoader(data, batch_size=4, seed=5)
    for epoch in range(3):
        ours.sampler.set_epoch(epoch)
        assert [b.tolist() for b in ours] == [b.tolist() for b in plain]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_mid_epoch_state_continues_with_the_next_batch(num_workers):
    data = list(range(30))
    loader = ResumableLoader(data, batch_size=4, seed=1, num_workers=num_workers)
    loader.sampler.set_epoch(2)
    iterator = iter(loader)
    seen = [next(iterator).tolist() for _ in range(3)]
    state = loader.state_dict()
    rest = [b.tolist() for b in iterator]
    assert state["epoch"] == 2 and state["position"] == 12
    resumed = ResumableLoader(data, batch_size=4, seed=1, num_workers=num_workers)
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == rest
    again = ResumableLoader(data, batch_size=4, seed=1)  # a second save after the resume counts from the start
    again.load_state_dict(state)
    iterator = iter(again)
    next(iterator)
    assert again.state_dict()["position"] == 16 and seen


def test_an_end_of_epoch_state_starts_the_next_epoch_whole_and_other_data_restart_with_a_warning():
    data = list(range(12))
    loader = ResumableLoader(data, batch_size=4, seed=0)
    assert len(list(loader)) == 3
    resumed = ResumableLoader(data, batch_size=4, seed=0)
    resumed.load_state_dict(loader.state_dict())
    resumed.sampler.set_epoch(1)  # Lightning moves on to the next epoch
    expected = ResumableSampler(data, seed=0).order(1)
    assert torch.cat(list(resumed)).tolist() == expected
    other = ResumableLoader(data, batch_size=4, seed=9)
    with pytest.warns(UserWarning, match="restarts from its first batch"):
        other.load_state_dict(loader.state_dict())
    assert len(list(other)) == 3


def test_data_parallel_ranks_share_the_epoch():
    data = list(range(11))
    ranks = [ResumableSampler(data, seed=2, num_replicas=2, rank=r) for r in (0, 1)]
    orders = [sampler.order(1) for sampler in ranks]
    assert len(orders[0]) == len(orders[1]) == 6 and set(orders[0]) | set(orders[1]) == set(data)
    single = ResumableSampler(data, seed=2).order(1)
    assert orders[0] == single[0::2] and orders[1][:5] == single[1::2]


class _Killed(Exception):
    pass


class _Record(Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.stop_at = stop_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.stop_at:
            raise _Killed  # killed here: nothing of this step is trained or saved
        self.batches.append(batch[1].tolist())


ARGS = dict(
    model_name="vit_tiny_patch16_224",
    num_classes=10,
    model_kwargs={"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "drop_rate": 0.2},
)


def _fit(folder, stop_at=None, ckpt_path=None, record=None):
    pl.seed_everything(3)
    module = ImageClassifier(**ARGS)
    record = record or _Record(stop_at)
    checkpoint = ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0, every_n_train_steps=4)
    trainer = pl.Trainer(
        **trainer_kwargs(folder, enable_checkpointing=True, max_epochs=2, limit_train_batches=10),
        callbacks=[record, checkpoint],
        limit_val_batches=0,
    )
    trainer.fit(module, Digits(image_size=16, batch_size=8), ckpt_path=ckpt_path)
    return module, record.batches


def test_killed_mid_epoch_and_resumed_equals_the_uninterrupted_run(tmp_path):
    full, batches = _fit(tmp_path / "full")
    # killed in epoch 1 at batch 4 (step 14); last.ckpt holds step 12
    before = _Record(stop_at=14)
    with pytest.raises(_Killed):
        _fit(tmp_path / "killed", record=before)
    resumed, after = _fit(tmp_path / "resumed", ckpt_path=tmp_path / "killed" / "last.ckpt")
    assert len(batches) == 20 and before.batches[:12] + after == batches
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
