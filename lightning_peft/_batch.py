"""The loss of one batch, for methods that score the model between optimizer steps (IST, early pruning's check)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_peft._compat import muted_logging


def batch_loss(pl_module: pl.LightningModule, batch: Any, batch_idx: int, needed_by: str, hint: str = "") -> Tensor:
    """``compute_loss(batch)`` if the module has it, else ``training_step(batch, batch_idx)`` with logging muted.

    Args:
        pl_module: the module.
        batch: a training batch.
        batch_idx: its index, passed to ``training_step``.
        needed_by: who asks, for the error message (``"IST"``).
        hint: more ways out, appended to the error's hint.

    Raises:
        TypeError: if ``training_step`` returns neither a tensor nor a dict with a ``"loss"`` tensor.

    Example::

        >>> import torch
        >>> class Module(pl.LightningModule):
        ...     def training_step(self, batch, batch_idx):
        ...         self.log("train/loss", 1.0)  # muted: no Trainer needed
        ...         return {"loss": batch.sum()}
        >>> batch_loss(Module(), torch.ones(3), 0, "IST")
        tensor(3.)
    """
    compute_loss = getattr(pl_module, "compute_loss", None)
    if callable(compute_loss):
        output = compute_loss(batch)
    else:
        with muted_logging(pl_module):
            output = pl_module.training_step(batch, batch_idx)
    if isinstance(output, Mapping):
        output = output.get("loss")
    if not isinstance(output, Tensor):
        raise TypeError(
            f"{needed_by} needs the loss of a batch, but {type(pl_module).__name__}.training_step returned"
            f" {type(output).__name__}. HINT: return the loss tensor or a dict with a 'loss' key, or add a"
            f" `compute_loss(batch)` method{hint}."
        )
    return output
