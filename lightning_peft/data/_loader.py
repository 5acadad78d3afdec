"""Training loaders that carry their position, so a run resumed mid-epoch sees exactly the batches it would have seen.

Lightning saves the ``state_dict()`` of a training DataLoader that has one into every checkpoint and hands it back to
``load_state_dict()`` on resume; a plain ``DataLoader`` has none, so a run resumed mid-epoch starts the epoch over
(it trains the first batches twice and never sees the last ones). :class:`ResumableLoader` records which epoch it is
in and how many batches it has delivered; :class:`ResumableSampler` draws each epoch's order from the seed and the
epoch alone, so the order of any epoch can be drawn again and the delivered part skipped without loading it.

Every DataModule of this package builds its training loader here (``SplitDataModule.train_dataloader``); a new
DataModule gets exact resume by doing the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

__all__ = ["ResumableLoader", "ResumableSampler"]


class ResumableSampler(DistributedSampler):
    """A seeded shuffle whose order depends only on ``seed`` and the epoch, and which can start mid-epoch.

    On one process, epoch ``e`` yields exactly the order of ``DataLoader(dataset, shuffle=True,
    generator=torch.Generator().manual_seed(seed))`` in its ``e``-th epoch (so results measured with that loader stay
    valid). Under DDP (``torch.distributed`` initialised when it is built) every rank draws the same order and keeps
    its share, padded to equal lengths, as ``DistributedSampler`` does; being one, Lightning leaves it in place rather
    than wrapping it. Lightning calls :meth:`set_epoch` at every epoch.

    Args:
        dataset: the dataset to sample (its length is read).
        seed: seed of the order.
        shuffle: False gives the dataset order.
        num_replicas: processes sharing the data (default: the ``torch.distributed`` world size, or 1); Lightning
            states it as ``trainer.strategy.distributed_sampler_kwargs`` (data-parallel ranks only).
        rank: this process's share (default: its ``torch.distributed`` rank, or 0).

    Example::

        >>> sampler = ResumableSampler(list(range(6)), seed=0)
        >>> order = list(sampler)
        >>> sampler.resume_at(epoch=0, position=4)
        >>> list(sampler) == order[4:]
        True
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0  # the position this epoch's iteration started from (0, or where a resumed run stopped)
        self._resume: tuple[int, int] | None = None

    def order(self, epoch: int) -> list[int]:
        """This process's indices of ``epoch``, in order."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if not self.shuffle:
            indices = list(range(n))
        else:
            # The draws of a DataLoader's RandomSampler sharing the loader's generator, epoch after epoch: the
            # loader's iterator draws its base seed, then the sampler draws two permutations (the second one empty
            # of use: RandomSampler slices it to `num_samples % n`).
            generator = torch.Generator().manual_seed(self.seed)
            for _ in range(epoch):
                torch.empty((), dtype=torch.int64).random_(generator=generator)
                torch.randperm(n, generator=generator)
                torch.randperm(n, generator=generator)
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            indices = torch.randperm(n, generator=generator).tolist()
        if self.num_replicas > 1:
            indices += indices[: self.total_size - n]
            indices = indices[self.rank : self.total_size : self.num_replicas]
        return indices

    def resume_at(self, epoch: int, position: int) -> None:
        """Start the next iteration at ``position`` of ``epoch``'s order, if that epoch is the one iterated next."""
        self._resume = (int(epoch), int(position))
        self.set_epoch(int(epoch))

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._resume is not None:
            epoch, position = self._resume
            self._resume = None
            if epoch == self.epoch:  # a run stopped at the end of an epoch continues with a whole new one
                start = position
        self.start = start
        yield from self.order(self.epoch)[start:]


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` whose position Lightning saves in checkpoints and restores on resume.

    It shuffles with a :class:`ResumableSampler` and counts the batches it delivers; ``state_dict()`` holds the
    epoch and the position in it, ``load_state_dict()`` makes the next iteration skip what was delivered before
    (indices only: the skipped samples are not loaded). The count is taken where batches leave the loader, so worker
    processes prefetching ahead do not shift it. A checkpoint whose seed or dataset length differs from this loader
    resumes at the start of the epoch, with a warning.

    Args:
        dataset: the training set.
        batch_size: samples per batch.
        seed: seed of the shuffle (same seed, same batches).
        shuffle: False keeps the dataset order (the position is still carried).
        sampler: another sampler, which replaces the resumable one (Lightning passes one when it rebuilds a loader,
            e.g. for ``overfit_batches``); the position is then not carried.
        num_replicas: see :class:`ResumableSampler`.
        rank: see :class:`ResumableSampler`.
        **kwargs: more ``DataLoader`` arguments (``num_workers``, ``collate_fn``, ...).

    Example::

        >>> loader = ResumableLoader(list(range(10)), batch_size=2, seed=0)
        >>> batches = iter(loader)
        >>> first = [next(batches) for _ in range(2)]
        >>> state = loader.state_dict()
        >>> resumed = ResumableLoader(list(range(10)), batch_size=2, seed=0)
        >>> resumed.load_state_dict(state)
        >>> [b.tolist() for b in resumed] == [b.tolist() for b in list(batches)]
        True
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        sampler: Sampler | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.seed = seed
        if sampler is None:
            sampler = ResumableSampler(dataset, seed=seed, shuffle=shuffle, num_replicas=num_replicas, rank=rank)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._delivered = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._delivered = 0
        # The base seed of worker processes comes from the loader's generator: one that depends only on the seed and
        # the epoch keeps the global generator untouched (dropout draws from it) and the workers' seeds resumable.
        epoch = getattr(self.sampler, "epoch", 0)
        self.generator = torch.Generator().manual_seed(self.seed + 1_000_003 * epoch)
        for batch in super().__iter__():
            self._delivered += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The epoch, the position in it (in samples of this process) and what identifies the order."""
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):
            return {}
        position = sampler.start + self._delivered * (self.batch_size or 1)
        return {"epoch": sampler.epoch, "position": position, "seed": self.seed, "length": len(sampler.dataset)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue at the saved position when the checkpoint's order is this loader's (same seed and length)."""
        sampler = self.sampler
        if not state_dict or not isinstance(sampler, ResumableSampler):
            return
        same = state_dict.get("seed") == self.seed and state_dict.get("length") == len(sampler.dataset)
        if not same:
            rank_zero_warn(
                f"The checkpoint's training data (seed {state_dict.get('seed')}, {state_dict.get('length')} samples)"
                f" differs from this run's (seed {self.seed}, {len(sampler.dataset)} samples): the epoch restarts"
                " from its first batch. HINT: resume with the data settings of the interrupted run to continue at"
                " the exact batch."
            )
            sampler.set_epoch(int(state_dict.get("epoch", 0)))
            return
        sampler.resume_at(state_dict["epoch"], state_dict["position"])
