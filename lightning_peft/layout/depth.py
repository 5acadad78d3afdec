"""Every parameter's depth from the top of a model: what gradual unfreezing and layer-wise LR decay share.

:func:`depth_groups` splits the parameters of a model into the groups those methods work on, from the top (the
output) down:

* group 0, the **top**: the output head (:func:`~lightning_peft.layout.find_head`) and every parameter registered
  after the last block (final norm, pooler);
* groups 1 .. L, the **blocks** of :func:`~lightning_peft.layout.find_blocks` (timm's ``group_matcher`` where the
  model declares one, else the layout registry), the top block first; a model with several stacks (encoder and
  decoder, the stages of a CNN) is one column of all its blocks in forward order, so the last decoder block is
  group 1 and the first encoder block group L;
* group L + 1, the **embeddings**: every parameter registered before the first block, and those a timm model's
  ``group_matcher`` names as its stem (``patch_embed``, ``cls_token``, ``pos_embed``).

A parameter outside the blocks but between two of them (a CNN's downsampler between stages, an encoder's final norm
before the decoder) goes with the block registered after it. A weight the head shares with the embeddings (a causal
LM's tied ``lm_head``) is the head's: group 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lightning_peft.layout.head import find_head
from lightning_peft.layout.stacks import LayerStack, find_blocks

__all__ = ["DepthGroups", "depth_groups"]


@dataclass(frozen=True)
class DepthGroups:
    """The parameters of a model by depth from the top: built by :func:`depth_groups`.

    Attributes:
        stack: the blocks, as :func:`~lightning_peft.layout.find_blocks` found them.
        groups: parameter names per depth: ``groups[0]`` the top (head, final norm), ``groups[d]`` for ``1 <= d <=
            L`` block ``L - d`` of the stack (the top block first), ``groups[L + 1]`` the embeddings.
    """

    stack: LayerStack
    groups: tuple[tuple[str, ...], ...]

    @property
    def n_blocks(self) -> int:
        """The number of blocks (L)."""
        return len(self.stack)

    @property
    def top(self) -> tuple[str, ...]:
        """The head and what follows the last block."""
        return self.groups[0]

    @property
    def embeddings(self) -> tuple[str, ...]:
        """What precedes the first block (and a timm model's stem)."""
        return self.groups[-1]

    def depth_of(self) -> dict[str, int]:
        """Parameter name to depth (0: top, L + 1: embeddings)."""
        return {name: depth for depth, names in enumerate(self.groups) for name in names}


def _stem_patterns(model: nn.Module) -> list[tuple[str, re.Pattern]]:
    """The stem patterns of every module that declares a timm ``group_matcher``, with the module's prefix."""
    found = []
    for prefix, module in model.named_modules():
        matcher = getattr(type(module), "group_matcher", None)
        if not callable(matcher):
            continue
        try:
            groups = module.group_matcher(coarse=False)
        except Exception:  # a matcher that needs arguments or fails: no declaration to read
            continue
        if not isinstance(groups, dict):
            continue
        for key, value in groups.items():
            if key.startswith("stem"):
                entries = [value] if isinstance(value, str) else [p for p, _ in value]
                found += [(prefix, re.compile(p)) for p in entries]
    return found


def _under(name: str, prefix: str) -> bool:
    return not prefix or name.startswith(prefix + ".")


def depth_groups(model: nn.Module, layers: str | Sequence[str] | None = None) -> DepthGroups:
    """Split the parameters of ``model`` by depth from the top (see the module docstring).

    Args:
        model: any module: a timm / transformers model, a LightningModule holding one, your own model.
        layers: the block container path(s), as for :func:`~lightning_peft.layout.find_blocks`.

    Returns:
        The :class:`DepthGroups`; every parameter of ``model.named_parameters()`` is in exactly one group.

    Raises:
        ValueError: if the blocks cannot be found (see :func:`~lightning_peft.layout.find_blocks`).

    Example::

        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=8, num_classes=3)
        >>> groups = depth_groups(vit)
        >>> groups.n_blocks, sorted(groups.top), groups.groups[1][0]
        (2, ['head.bias', 'head.weight', 'norm.bias', 'norm.weight'], 'blocks.1.norm1.weight')
        >>> groups.embeddings[:3]
        ('cls_token', 'pos_embed', 'patch_embed.proj.weight')
    """
    stack = find_blocks(model, layers)
    n_blocks = len(stack)
    head_modules = find_head(model)
    head_ids = {id(p) for name in head_modules for p in model.get_submodule(name).parameters()}
    stems = _stem_patterns(model)
    groups: list[list[str]] = [[] for _ in range(n_blocks + 2)]
    pending: list[str] = []  # outside parameters waiting for the next block
    seen_block = False
    for name, param in model.named_parameters():
        block = stack.block_of(name)
        if id(param) in head_ids:
            groups[0].append(name)
        elif block is not None:
            depth = n_blocks - block
            groups[depth] += pending if seen_block else []
            groups[n_blocks + 1] += [] if seen_block else pending
            pending = []
            seen_block = True
            groups[depth].append(name)
        elif any(p.match(name[len(prefix) + 1 :] if prefix else name) for prefix, p in stems if _under(name, prefix)):
            groups[n_blocks + 1].append(name)
        else:
            pending.append(name)
    groups[0 if seen_block else n_blocks + 1] += pending
    return DepthGroups(stack, tuple(tuple(g) for g in groups))
