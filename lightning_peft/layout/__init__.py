"""The model layout spine: the stacks of blocks, what is inside a block, and the output head after them.

:mod:`.stacks` finds every stack of blocks, :mod:`.anatomy` what is inside each block, :mod:`.head` the head.
"""

from lightning_peft.layout.anatomy import (
    ROLE_CATEGORIES,
    AttentionSite,
    AttentionSpec,
    BlockAnatomy,
    BlockUnit,
    MlpSite,
    MlpSpec,
    block_anatomy,
    block_units,
    in_features,
    is_projection,
    out_features,
    register_layout,
)
from lightning_peft.layout.head import HEAD_NAMES, find_head
from lightning_peft.layout.stacks import LayerStack, Stack, find_blocks, resolve_paths

__all__ = [
    "HEAD_NAMES",
    "ROLE_CATEGORIES",
    "AttentionSite",
    "AttentionSpec",
    "BlockAnatomy",
    "BlockUnit",
    "LayerStack",
    "MlpSite",
    "MlpSpec",
    "Stack",
    "block_anatomy",
    "block_units",
    "find_head",
    "find_blocks",
    "in_features",
    "is_projection",
    "out_features",
    "register_layout",
    "resolve_paths",
]
