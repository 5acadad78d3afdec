"""What a cut carries over from the unpruned model to the pruned one: optimizer state, the DDP wrapper, the controller.

The surgery (:mod:`lightning_peft.pruning.surgery`) records every parameter it replaced or removed in a
:class:`~lightning_peft.pruning.ParameterReplacements`; from that record the optimizer keeps its param groups with
the smaller parameters in place of the old ones and the state of the kept slices, DDP is wrapped again around the
new parameters, and the trainable-set controller (LISA, Half Fine-Tuning, IST) learns them.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_peft._compat import rewrap_ddp
from lightning_peft.pruning.surgery import ParameterReplacements
from lightning_peft.trainable import TrainableSetController

__all__ = ["carry_over", "replace_in_optimizer"]


def _slice_state(state: dict, shape: torch.Size, ops: list[tuple[int, Tensor]]) -> dict | None:
    new = {}
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == shape and value.dim() > 0:
            for dim, index in ops:
                value = value.index_select(dim, index.to(value.device))
            new[key] = value.clone()
        elif isinstance(value, Tensor) and value.numel() > 1:
            return None  # a layout we cannot slice (e.g. block-wise quantized state): start fresh
        else:
            new[key] = value
    return new


def replace_in_optimizer(
    optimizer: torch.optim.Optimizer, record: ParameterReplacements, drop: Sequence[Tensor] = ()
) -> None:
    """Point ``optimizer`` at the pruned parameters, keeping the state of the surviving slices.

    Param groups are edited in place (never added or removed), so LR schedulers holding this optimizer keep working.
    State tensors shaped like the parameter (Adam's ``exp_avg`` / ``exp_avg_sq``, momentum buffers) are sliced like
    it; scalar state (``step``) is kept; state of another layout (8-bit block-wise) is dropped, so that parameter
    restarts with fresh state. Parameters in ``drop`` or recorded as removed leave the groups with their state.
    """
    mapping = record.mapping()
    gone = {id(p) for p in drop} | set(record.removed)
    for group in optimizer.param_groups:
        params = []
        for param in group["params"]:
            if id(param) in gone:
                optimizer.state.pop(param, None)
                continue
            if id(param) not in mapping:
                params.append(param)
                continue
            new, ops = mapping[id(param)]
            state = optimizer.state.pop(param, None)
            if state:
                sliced = _slice_state(state, param.shape, ops)
                if sliced is not None:
                    optimizer.state[new] = sliced
            params.append(new)
        group["params"] = params


def carry_over(
    trainer: pl.Trainer, pl_module: pl.LightningModule, record: ParameterReplacements, drop: Sequence[Tensor] = ()
) -> None:
    """Make the running fit continue on the pruned model, in place.

    Every optimizer points at the new parameters (:func:`replace_in_optimizer`; ``drop``: parameters that leave
    training, such as the pruning masks), gradients are cleared, a DDP wrapper is rebuilt around the new
    parameters, and the trainable-set controller, when a method uses it, is refreshed.

    Args:
        trainer: the running Trainer.
        pl_module: the LightningModule that was pruned.
        record: what the surgery replaced and removed (:func:`~lightning_peft.pruning.apply_pruning_plan`).
        drop: parameters to take out of the optimizers with their state.
    """
    for optimizer in trainer.optimizers:
        replace_in_optimizer(optimizer, record, drop=drop)
    for param in pl_module.parameters():
        param.grad = None
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        # DDP's reducer holds the old parameters; a new wrapper registers the new ones (and broadcasts rank 0's
        # values, which are identical anyway since every rank applied the same plan).
        rewrap_ddp(strategy, pl_module)
    controller = TrainableSetController.of(trainer)
    if controller is not None:
        controller.refresh(trainer, pl_module)
