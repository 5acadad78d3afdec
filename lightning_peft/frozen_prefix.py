"""Run the frozen blocks below the lowest trained block without building the autograd graph.

When nothing below the lowest trained block trains, its input needs no gradient and the blocks below it need no
backward. Autograd already records nothing there when no tensor entering them requires grad. One common case
breaks that: transformers' activation checkpointing calls ``enable_input_require_grads()``, which marks the
embedding output as requiring grad (a leaf, no parameter behind it) so that checkpointed blocks receive a
gradient-carrying input. Then every frozen block below the trained ones builds its graph (saved activations, or a
recomputation under checkpointing) and backward runs through it for nothing. :class:`FrozenPrefix` hooks those
blocks: each runs under ``torch.no_grad()`` and its output is handed on as a leaf that requires grad when its input
did, so the first trained block sees what it would have seen.

A block is run this way only if, at that call, grad mode is on, none of its parameters requires grad, and no tensor
among its inputs carries a graph (``grad_fn``): a trained parameter below would have one, and then the block runs
as usual. A leaf input that requires grad gets no ``.grad`` through these blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["FrozenPrefix"]


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _mark(value: Any) -> Any:
    """``value`` with every floating tensor made a leaf that requires grad (tuples and lists rebuilt)."""
    if isinstance(value, Tensor):
        return value.detach().requires_grad_(True) if value.is_floating_point() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_mark(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_mark(v) for v in value)
    return value


class FrozenPrefix:
    """Hooks that run a list of frozen blocks without autograd (see the module docstring).

    Args:
        blocks: the blocks below the lowest trained one, in forward order.

    Example::

        >>> from torch import nn
        >>> blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        >>> blocks[0].requires_grad_(False)  # doctest: +ELLIPSIS
        Linear(...)
        >>> prefix = FrozenPrefix(blocks[:1])
        >>> x = torch.ones(2, 4, requires_grad=True)
        >>> h = blocks[0](x)
        >>> h.grad_fn is None, h.requires_grad
        (True, True)
        >>> prefix.remove()
        >>> blocks[0](x).grad_fn is None
        False
    """

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self.blocks = list(blocks)
        self.calls_without_graph = 0
        self._handles: list[RemovableHandle] = []
        self._open: dict[int, list[tuple[bool, bool] | None]] = {}
        for block in self.blocks:
            params = list(block.parameters())
            self._open[id(block)] = []
            self._handles.append(block.register_forward_pre_hook(self._pre_hook(params), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._post_hook, always_call=True))

    def _pre_hook(self, params: list[nn.Parameter]) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            entered = None
            if torch.is_grad_enabled() and not any(p.requires_grad for p in params):
                inputs = _tensors(args) + _tensors(kwargs)
                if not any(t.grad_fn is not None for t in inputs):
                    entered = (True, any(t.requires_grad for t in inputs))
                    torch.set_grad_enabled(False)
                    self.calls_without_graph += 1
            self._open[id(module)].append(entered)

        return hook

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        entered = self._open[id(module)].pop() if self._open[id(module)] else None
        if entered is None:
            return None
        torch.set_grad_enabled(True)
        return _mark(output) if entered[1] else None

    def remove(self) -> None:
        """Remove every hook (through its handle); the blocks run as usual again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
