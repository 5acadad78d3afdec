"""Find the block stacks of any model (kept as the short import path of :mod:`lightning_peft.layout`)."""

from lightning_peft.layout import ROLE_CATEGORIES, BlockUnit, LayerStack, Stack, find_layers

__all__ = ["ROLE_CATEGORIES", "BlockUnit", "LayerStack", "Stack", "find_layers"]
