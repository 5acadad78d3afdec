"""The loaders every offline DataModule of this package shares: fixed train / val / test splits."""

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_peft.data._loader import ResumableLoader


class SplitDataModule(pl.LightningDataModule):
    """A DataModule whose ``setup`` fills ``train_set`` / ``val_set`` / ``test_set`` once.

    Subclasses set ``batch_size``, ``seed`` and ``num_workers`` and implement ``setup`` (returning early when
    ``train_set`` is already built). The training loader shuffles with a generator seeded by ``seed``, so two runs
    with the same seed see the same batches, and carries its position into checkpoints, so a run resumed mid-epoch
    continues with the batch it would have seen next (:class:`~lightning_peft.data._loader.ResumableLoader`).
    """

    batch_size: int
    seed: int
    num_workers: int
    train_set: Dataset | None = None
    val_set: Dataset | None = None
    test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator, num_workers=self.num_workers
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the training split, resumable mid-epoch (:class:`ResumableLoader`)."""
        self.setup()
        trainer = self.trainer
        shares = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer is not None else None
        return ResumableLoader(
            self.train_set,
            batch_size=self.batch_size,
            seed=self.seed,
            num_workers=self.num_workers,
            num_replicas=(shares or {}).get("num_replicas"),
            rank=(shares or {}).get("rank"),
        )

    @override
    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        """The test split, in order (``lightning-peft predict`` returns the logits of each batch)."""
        self.setup()
        return self._loader(self.test_set, shuffle=False)
