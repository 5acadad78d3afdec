"""The model layout spine: every stack of blocks (:mod:`.stacks`) and what is inside each block (:mod:`.anatomy`)."""

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
from lightning_peft.layout.stacks import LayerStack, Stack, find_layers, resolve_paths

__all__ = [
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
    "find_layers",
    "in_features",
    "is_projection",
    "out_features",
    "register_layout",
    "resolve_paths",
]
