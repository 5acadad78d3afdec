"""The loaders every offline DataModule of this package shares: fixed train / val / test splits."""

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override


class SplitDataModule(pl.LightningDataModule):
    """A DataModule whose ``setup`` fills ``train_set`` / ``val_set`` / ``test_set`` once.

    Subclasses set ``batch_size``, ``seed`` and ``num_workers`` and implement ``setup`` (returning early when
    ``train_set`` is already built). The training loader shuffles with a generator seeded by ``seed``, so two runs
    with the same seed see the same batches.
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
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)
