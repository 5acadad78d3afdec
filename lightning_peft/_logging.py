"""Logging helpers shared by the callbacks (kept as a short import path of :mod:`lightning_peft._compat`)."""

from lightning_peft._compat import logger_writes_this_step

__all__ = ["logger_writes_this_step"]
