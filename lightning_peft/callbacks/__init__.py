"""Lightning callbacks of lightning-peft: one public class per file."""

from lightning_peft.callbacks.activation_quantization import ActivationQuantization
from lightning_peft.callbacks.early_pruning import EarlyPruning
from lightning_peft.callbacks.gradual_unfreezing import GradualUnfreezing
from lightning_peft.callbacks.half_finetuning import HalfFineTuning
from lightning_peft.callbacks.ist import IST
from lightning_peft.callbacks.layerwise_lr_decay import LayerwiseLRDecay
from lightning_peft.callbacks.lisa import LISA
from lightning_peft.callbacks.memory_breakdown import MemoryBreakdown
from lightning_peft.callbacks.optimizer_in_backward import OptimizerInBackward

__all__ = [
    "ActivationQuantization",
    "EarlyPruning",
    "GradualUnfreezing",
    "HalfFineTuning",
    "IST",
    "LISA",
    "LayerwiseLRDecay",
    "MemoryBreakdown",
    "OptimizerInBackward",
]
