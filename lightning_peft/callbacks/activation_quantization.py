"""Store the activations saved for backward in 8 bits during training steps, for any precision and strategy."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_peft._compat import logger_writes_this_step
from lightning_peft._sharding import check_optimizers
from lightning_peft._validation import check_bool
from lightning_peft.quantization import DEFAULT_MIN_NUMEL, ActivationQuantizer, SavedTensorStats

__all__ = ["ActivationQuantization"]

_MIB = float(1 << 20)


class ActivationQuantization(Callback):
    """Quantize the tensors autograd saves for backward (int8 or FP8, per-group scales) during training steps.

    Activation-compressed training as in ActNN (https://arxiv.org/abs/2104.14129), Mesa
    (https://arxiv.org/abs/2111.11124) and COAT (https://arxiv.org/abs/2410.19313), but model-agnostic: no layer
    is replaced; ``torch.autograd.graph.saved_tensors_hooks`` quantize what is saved in the forward of each
    training step and restore it in backward. Parameters, integer tensors and small tensors are kept as they are,
    autocast's low-precision copies of weights are cast again in backward rather than kept (exact), and a storage
    saved several times is stored once. This halves the memory of saved activations in bf16 / fp16 (and quarters
    it in fp32) at a small cost in gradient accuracy.

    The hooks are entered in ``on_train_batch_start`` and left in ``on_before_backward`` (and at the latest in
    ``on_train_batch_end`` or ``on_exception``), so validation, testing and prediction are untouched, backward
    (and the recomputation of activation checkpoints) runs without them, and checkpointed regions inside the
    model keep their own hooks: activation checkpointing stays effective. Works with every precision setting; as a
    callback it does not replace the strategy's precision plugin, which is what FSDP and DeepSpeed require (tested
    on single device, DDP and FSDP2 — ``ModelParallelStrategy`` with ``fully_shard`` —, where it quantizes exactly
    what it quantizes on one device; ``FSDPStrategy`` and DeepSpeed need a GPU and are not covered by tests). Use
    :class:`~lightning_peft.plugins.ActivationQuantizedPrecision` if you prefer to think of it as a precision mode,
    on single device or DDP.

    Logs ``activation_quantization/bytes_before`` and ``activation_quantization/bytes_after`` on the steps the
    loggers write (every ``log_every_n_steps``): the unique bytes autograd would hold for backward without and
    with quantization (parameters not counted).

    Args:
        format: ``"int8"`` (absmax, 255 levels; most accurate), ``"fp8_e4m3"`` or ``"fp8_e5m2"`` (per-group
            scaled ``torch.float8`` values).
        group_size: consecutive elements sharing one float32 scale; groups run along the last dimension when it
            is a multiple of ``group_size``.
        min_numel: tensors with fewer elements are kept as they are.
        stochastic_rounding: unbiased random rounding (its own generator; global RNG untouched).
        exclude_modules: glob patterns of module names (``named_modules()`` of the LightningModule, e.g.
            ``"model.head"``) whose saved tensors are kept as they are.
        compile: fuse quantization and dequantization with ``torch.compile``. ``None`` (default): on a CUDA GPU,
            where the eager ops' several passes over memory cost most (the first step compiles; if compilation
            fails, a warning and the eager kernels); ``True``: also on CPU; ``False``: never.
        recompute_weight_copies: autocast makes a low-precision copy of each weight, which the layer saves for
            backward (2 bytes per parameter in bf16, 2.1 GiB of a 1.1B model); instead, cast the weight again when
            backward needs it. Bit-identical; one cast per weight in backward. Where the copy's parameter cannot be
            proven (a frozen weight outside a plain ``nn.Linear``), the copy is kept.
        log_bytes: log the before / after bytes with ``pl_module.log``.

    Raises:
        ValueError: for an unknown ``format``, a ``group_size`` below 1, a negative ``min_numel``, a non-list
            ``exclude_modules`` or a non-bool ``recompute_weight_copies``; in ``setup``, for an ``exclude_modules``
            pattern that matches no module; at the start of training, for a bitsandbytes optimizer over FSDP2's
            sharded parameters.

    Example::

        import lightning as L
        from lightning_peft.callbacks import ActivationQuantization

        trainer = L.Trainer(precision="bf16-mixed", callbacks=[ActivationQuantization(format="int8")])
    """

    def __init__(
        self,
        format: Literal["int8", "fp8_e4m3", "fp8_e5m2"] = "int8",
        group_size: int = 128,
        min_numel: int = DEFAULT_MIN_NUMEL,
        stochastic_rounding: bool = False,
        exclude_modules: list[str] | None = None,
        compile: bool | None = None,
        recompute_weight_copies: bool = True,
        log_bytes: bool = True,
    ) -> None:
        self.quantizer = ActivationQuantizer(
            format=format,
            group_size=group_size,
            min_numel=min_numel,
            stochastic_rounding=stochastic_rounding,
            exclude_modules=exclude_modules,
            compile=compile,
            recompute_weight_copies=recompute_weight_copies,
        )
        self.log_bytes = check_bool("log_bytes", log_bytes)
        self._reported = False

    @property
    def last_stats(self) -> SavedTensorStats:
        """The statistics of the latest training step."""
        return self.quantizer.stats

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.quantizer.attach(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_optimizers(trainer)  # the 8-bit-memory combination (AdamW8bit) does not shard: say so before a step

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.quantizer.start_step()
        self.quantizer.enable_hooks()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.quantizer.disable_hooks()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # manual optimization may run several forward / backward pairs in one training step
        if not pl_module.automatic_optimization and trainer.training:
            self.quantizer.enable_hooks()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.quantizer.disable_hooks()
        stats = self.quantizer.end_step()
        if stats.num_saved == 0:
            return
        if self.log_bytes and logger_writes_this_step(trainer):  # `log` costs ~0.5 ms: only on logger steps
            pl_module.log("activation_quantization/bytes_before", float(stats.bytes_before), on_step=True)
            pl_module.log("activation_quantization/bytes_after", float(stats.bytes_after), on_step=True)
        if not self._reported:
            self._reported = True
            rank_zero_info(
                f"{type(self).__name__}({self.quantizer.format}): saved for backward in the first step"
                f" {stats.bytes_before / _MIB:.1f} MiB -> {stats.bytes_after / _MIB:.1f} MiB"
                f" ({stats.ratio:.2f}x; {stats.num_quantized} of {stats.num_saved} tensors quantized,"
                f" {stats.num_recomputed} weight copies cast again in backward instead of kept)."
            )

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.quantizer.disable_hooks()
        self.quantizer.end_step()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.quantizer.disable_hooks()
        self.quantizer.end_step()
        if stage == "fit":
            self.quantizer.detach()
