"""Lightning callbacks of lightning-peft: one public class per file."""

from lightning_peft.callbacks.lisa import LISA

__all__ = ["LISA"]
