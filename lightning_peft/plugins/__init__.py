"""Precision plugins: Lightning's mixed precision with activations saved for backward in 8 bits."""

from lightning_peft.plugins.activation_quantized_precision import ActivationQuantizedPrecision

__all__ = ["ActivationQuantizedPrecision"]
