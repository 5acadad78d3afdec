"""Packing and unpacking of tensors saved for backward in 8 bits (int8, FP8), shared by callback and plugin."""

from lightning_peft.quantization.formats import FORMATS, QuantizedTensor, dequantize, quantize
from lightning_peft.quantization.saved_tensors import (
    DEFAULT_MIN_NUMEL,
    ActivationQuantizer,
    SavedTensorStats,
    skip_quantization,
)

__all__ = [
    "DEFAULT_MIN_NUMEL",
    "FORMATS",
    "ActivationQuantizer",
    "QuantizedTensor",
    "SavedTensorStats",
    "dequantize",
    "quantize",
    "skip_quantization",
]
