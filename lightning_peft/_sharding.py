"""Copies of sharded (DTensor) parameters: the local shard in memory, the whole tensor in checkpoints.

Under FSDP2 (``fully_shard``) a parameter is a DTensor and each rank holds one shard. Callbacks that keep a copy of
parameter values (Half Fine-Tuning's pre-trained values) keep the local shard; a checkpoint holds whole tensors,
because Lightning writes the callbacks' state from rank 0 alone. Plain tensors pass through every function
unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _is_sharded(tensor: Tensor) -> bool:
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "to_local")


def local_part(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` held by this rank (the tensor itself unless it is a DTensor)."""
    return tensor.to_local() if _is_sharded(tensor) else tensor


def gather_whole(param: Tensor, local: Tensor) -> Tensor:
    """The whole tensor, on the CPU, of which ``local`` is this rank's part laid out like ``param``.

    A collective for a DTensor ``param`` (every rank must call it); ``local`` itself otherwise.
    """
    if not _is_sharded(param):
        return local
    from torch.distributed.tensor import DTensor

    mesh = param.device_mesh
    sharded = DTensor.from_local(
        local.to(mesh.device_type), mesh, param.placements, shape=param.shape, stride=param.stride()
    )
    return sharded.full_tensor().cpu()


def take_local(param: Tensor, whole: Tensor) -> Tensor:
    """This rank's part, on the CPU, of ``whole`` laid out like ``param`` (no communication)."""
    if not _is_sharded(param) or whole.shape != param.shape or local_part(param).shape == param.shape:
        return whole
    from torch.distributed.tensor import distribute_tensor

    mesh = param.device_mesh
    with torch.no_grad():
        sharded = distribute_tensor(whole.to(mesh.device_type), mesh, param.placements, src_data_rank=None)
    return sharded.to_local().cpu()


def check_optimizers(trainer: Any) -> None:
    """Refuse, before the first step, an optimizer that cannot update sharded (DTensor) parameters.

    bitsandbytes' 8-bit optimizers run their own kernels on the parameter's storage, which a DTensor does not
    expose: under FSDP2 their first step fails deep inside bitsandbytes ("... does not have a sharding strategy
    registered").

    Raises:
        ValueError: for a bitsandbytes optimizer over DTensor parameters.
    """
    for optimizer in getattr(trainer, "optimizers", None) or ():
        if type(optimizer).__module__.split(".")[0] != "bitsandbytes":
            continue
        if any(_is_sharded(p) for group in optimizer.param_groups for p in group["params"]):
            raise ValueError(
                f"`{type(optimizer).__name__}` (bitsandbytes) cannot update FSDP2's sharded (DTensor) parameters."
                " HINT: use `torch.optim.AdamW` under `ModelParallelStrategy`, or train without sharding (single"
                " device or DDP) to keep the 8-bit optimizer state."
            )
