"""Memory-efficient fine-tuning methods as PyTorch Lightning callbacks and plugins."""

from lightning_peft import _offline_imports

# First, before anything imports peft (and with it bitsandbytes): no dependency's import may wait on the network.
_offline_imports.install()

__version__ = "0.1.0"
