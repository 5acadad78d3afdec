"""Mixed precision whose training steps store the activations saved for backward in 8 bits."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from typing import Literal

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from typing_extensions import override

from lightning_peft.quantization import DEFAULT_MIN_NUMEL, ActivationQuantizer, SavedTensorStats

__all__ = ["ActivationQuantizedPrecision"]


class ActivationQuantizedPrecision(MixedPrecision):
    """Automatic mixed precision plus 8-bit storage (int8 / FP8) of the activations saved for backward.

    COAT (https://arxiv.org/abs/2410.19313) stores activations in FP8 next to mixed-precision compute; Mesa
    (https://arxiv.org/abs/2111.11124) and ActNN (https://arxiv.org/abs/2104.14129) in 8 bits. This plugin does it
    for any model: during ``training_step`` it runs ``torch.autocast`` as
    :class:`~lightning.pytorch.plugins.precision.MixedPrecision` does, and quantizes what autograd saves with the
    package's one :class:`~lightning_peft.quantization.ActivationQuantizer` (also used by the
    :class:`~lightning_peft.callbacks.ActivationQuantization` callback). Validation, testing and prediction get
    plain autocast. Works on single device, DDP and FSDP2 (``ModelParallelStrategy``, which takes any precision
    plugin); ``FSDPStrategy`` and DeepSpeed accept only their own precision plugins: use the callback there.

    Args:
        precision: ``"bf16-mixed"`` or ``"16-mixed"`` (fp16 with a gradient scaler).
        format: ``"int8"``, ``"fp8_e4m3"`` or ``"fp8_e5m2"``.
        group_size: consecutive elements sharing one float32 scale.
        min_numel: tensors with fewer elements are kept as they are.
        stochastic_rounding: unbiased random rounding instead of round-to-nearest.
        exclude_modules: glob patterns of module names whose saved tensors are kept as they are.
        compile: fuse quantization and dequantization with ``torch.compile``; ``None`` (default): on a CUDA GPU.
        recompute_weight_copies: cast a weight again in backward instead of keeping autocast's copy of it from
            the forward (bit-identical; saves 2 bytes per parameter under bf16).
        device: device type of ``torch.autocast``; ``"cuda"`` when CUDA is available, else ``"cpu"``.
        scaler: a ``torch.amp.GradScaler`` for ``"16-mixed"`` (one is made if ``None``).

    Raises:
        ValueError: for a ``precision`` other than ``"bf16-mixed"`` / ``"16-mixed"``, and for the quantization
            arguments as :class:`~lightning_peft.quantization.ActivationQuantizer` checks them.

    Example::

        import lightning as L
        from lightning_peft.plugins import ActivationQuantizedPrecision

        trainer = L.Trainer(plugins=[ActivationQuantizedPrecision("bf16-mixed", format="fp8_e4m3")])

    or in a LightningCLI config::

        trainer:
          plugins:
            - class_path: lightning_peft.plugins.ActivationQuantizedPrecision
              init_args: {precision: bf16-mixed, format: int8}
    """

    def __init__(
        self,
        precision: Literal["bf16-mixed", "16-mixed"] = "bf16-mixed",
        format: Literal["int8", "fp8_e4m3", "fp8_e5m2"] = "int8",
        group_size: int = 128,
        min_numel: int = DEFAULT_MIN_NUMEL,
        stochastic_rounding: bool = False,
        exclude_modules: list[str] | None = None,
        compile: bool | None = None,
        recompute_weight_copies: bool = True,
        device: str | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if precision not in ("bf16-mixed", "16-mixed"):
            raise ValueError(
                f"`precision` must be 'bf16-mixed' or '16-mixed', got {precision!r}."
                " HINT: for full or true-half precision, keep Lightning's `precision=` and add the"
                " `ActivationQuantization` callback instead."
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(precision=precision, device=device, scaler=scaler)
        self.quantizer = ActivationQuantizer(
            format=format,
            group_size=group_size,
            min_numel=min_numel,
            stochastic_rounding=stochastic_rounding,
            exclude_modules=exclude_modules,
            compile=compile,
            recompute_weight_copies=recompute_weight_copies,
        )

    @property
    def last_stats(self) -> SavedTensorStats:
        """The statistics of the latest training step."""
        return self.quantizer.stats

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        self.quantizer.attach(module)
        return super().convert_module(module)

    @override
    @contextmanager
    def train_step_context(self) -> Generator[None, None, None]:
        """Autocast and the quantizing saved-tensor hooks around ``training_step``."""
        self.quantizer.start_step()
        try:
            with self.forward_context(), self.quantizer.saved_tensors_hooks():
                yield
        finally:
            self.quantizer.end_step()

    @override
    def teardown(self) -> None:
        self.quantizer.detach()
        super().teardown()
