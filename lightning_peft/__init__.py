"""Memory-efficient fine-tuning methods as PyTorch Lightning callbacks and plugins."""

__version__ = "0.1.0"
