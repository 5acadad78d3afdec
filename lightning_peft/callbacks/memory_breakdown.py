"""Print where the memory of a training run goes, measured on its first step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

__all__ = ["MemoryBreakdown"]


def _unique_bytes(tensors: Any) -> int:
    storages: dict[int, int] = {}
    for tensor in tensors:
        if isinstance(tensor, Tensor) and tensor.layout is torch.strided and not tensor.is_meta:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class MemoryBreakdown(Callback):
    """Measure parameters, gradients, optimizer state and saved activations on the first training step; print them.

    What :func:`lightning_peft.estimate.estimate_memory` predicts, measured in the run: unique storage bytes of the
    parameters, of the gradients (taken before the first optimizer step), of the optimizer state (after it) and of
    the tensors autograd saves for backward in the first forward (``saved_tensors_hooks``, parameters excluded).
    With :class:`~lightning_peft.callbacks.ActivationQuantization` or the
    :class:`~lightning_peft.plugins.ActivationQuantizedPrecision` plugin, saved activations are the bytes the
    quantizer keeps (its own statistics: a second pair of hooks would shadow its own). On a GPU, the allocator's peak
    of the step is printed too. Nothing is measured after the first step, so the run's speed is unaffected.

    Attributes:
        breakdown: the measured bytes by component (``params``, ``grads``, ``optimizer_state``,
            ``saved_activations``, ``total``, and ``cuda_peak`` on GPU); empty until the first step ends.

    Example::

        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[MemoryBreakdown()], max_steps=1)  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.breakdown: dict[str, int] = {}
        self._saved: dict[int, int] = {}
        self._parameter_storages: set[int] = set()
        self._hooks: Any = None
        self._done = False

    def _quantizer(self, trainer: pl.Trainer) -> Any:
        from lightning_peft.callbacks.activation_quantization import ActivationQuantization

        for callback in trainer.callbacks:
            if isinstance(callback, ActivationQuantization):
                return callback.quantizer
        return getattr(trainer.precision_plugin, "quantizer", None)

    def _pack(self, tensor: Tensor) -> Tensor:
        if tensor.layout is torch.strided and not tensor.is_meta:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self._parameter_storages:
                self._saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if self._done:
            return
        params = list(pl_module.parameters())
        self.breakdown["params"] = _unique_bytes(params)
        if torch.cuda.is_available() and any(p.is_cuda for p in params):
            torch.cuda.reset_peak_memory_stats()
        if self._quantizer(trainer) is None:
            self._parameter_storages = {p.untyped_storage().data_ptr() for p in params if p.layout is torch.strided}
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
            self._hooks.__enter__()

    def _leave_hooks(self) -> None:
        if self._hooks is not None:
            hooks, self._hooks = self._hooks, None
            hooks.__exit__(None, None, None)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._done:
            return
        self._leave_hooks()
        quantizer = self._quantizer(trainer)
        self.breakdown["saved_activations"] = (
            quantizer.stats.bytes_after if quantizer is not None else sum(self._saved.values())
        )
        self._saved.clear()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._done:
            self.breakdown["grads"] = _unique_bytes(p.grad for p in pl_module.parameters() if p.grad is not None)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if self._done:
            return
        self._done = True
        state = [v for optimizer in trainer.optimizers for s in optimizer.state.values() for v in s.values()]
        self.breakdown["optimizer_state"] = _unique_bytes(state)
        self.breakdown.setdefault("grads", 0)
        self.breakdown.setdefault("saved_activations", 0)
        components = ("params", "grads", "optimizer_state", "saved_activations")
        self.breakdown["total"] = sum(self.breakdown[k] for k in components)
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            self.breakdown["cuda_peak"] = torch.cuda.max_memory_allocated(pl_module.device)
        shown = ", ".join(f"{k.replace('_', ' ')} {self.breakdown[k] / 2**20:,.1f} MiB" for k in components)
        peak = (
            f"; CUDA peak allocated {self.breakdown['cuda_peak'] / 2**20:,.1f} MiB"
            if "cuda_peak" in self.breakdown
            else ""
        )
        rank_zero_info(
            f"MemoryBreakdown after the first step: {shown}; total {self.breakdown['total'] / 2**20:,.1f} MiB{peak}."
        )

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._leave_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._leave_hooks()
