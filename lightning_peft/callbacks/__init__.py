"""Lightning callbacks of lightning-peft: one public class per file."""

from lightning_peft.callbacks.activation_quantization import ActivationQuantization
from lightning_peft.callbacks.lisa import LISA

__all__ = ["ActivationQuantization", "LISA"]
