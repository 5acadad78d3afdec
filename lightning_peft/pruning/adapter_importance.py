"""Importance of the bottleneck / conformer adapters of :mod:`lightning_peft.adapters`.

The adapters' analogue of Light-PEFT's LoRA scores:

* module score ``||adapter(x)|| / ||x||`` -- the size of the adapter's correction relative to the hidden state it
  reads (for a sequential adapter that is the sublayer's output ``W x``, as in the LoRA score);
* bottleneck-unit score (the adapter's "rank"): first-order Taylor ``|Σ ∂L/∂θ ⊙ θ|`` over the unit's row of
  ``down`` (weight and bias) plus its column of ``up``.

The cuts these scores rank are in :mod:`lightning_peft.pruning.surgery`: a removed adapter leaves the model with
its hooks (:func:`~lightning_peft.pruning.remove_adapter`); a kept :class:`~lightning_peft.adapters.BottleneckAdapter`
keeps its most important bottleneck units (:func:`~lightning_peft.pruning.prune_adapter_units`). Conformer adapters
are scored and removed whole; their bottleneck (GLU halves, depthwise convolution, norm) is not sliced.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_peft.adapters import Adapter, BottleneckAdapter, adapter_modules

__all__ = ["AdapterImportance"]


class AdapterImportance:
    """Accumulates the module score and the bottleneck-unit Taylor score of every adapter under a root module.

    Same protocol as :class:`~lightning_peft.pruning.LoraImportance`: :meth:`install`, :attr:`recording`,
    :meth:`record_ranks` after backward, :meth:`module_scores`, :meth:`rank_scores` (``{path: {"adapter": scores}}``),
    :meth:`remove`.

    Args:
        root: the model; paths are relative to it.

    Example::

        >>> import timm, torch
        >>> from lightning_peft.adapters import add_adapters
        >>> vit = add_adapters(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2))
        >>> importance = AdapterImportance(vit)
        >>> importance.install(); importance.recording = True
        >>> _ = vit(torch.randn(1, 3, 32, 32)); importance.remove()
        >>> sorted(importance.module_scores())
        ['blocks.0.adapters.mlp', 'blocks.1.adapters.mlp']
    """

    def __init__(self, root: nn.Module) -> None:
        self.layers: dict[str, Adapter] = dict(adapter_modules(root))
        self.recording = False
        self._module_sum: dict[str, Tensor] = {}
        self._module_count: dict[str, int] = {}
        self._rank_sum: dict[str, Tensor] = {}
        self._rank_count = 0
        self._handles: list = []

    def install(self) -> None:
        """Register the forward hooks that measure the module score (idempotent)."""
        if self._handles:
            return
        for path, adapter in self.layers.items():
            self._handles.append(adapter.register_forward_hook(self._hook(path)))

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, path: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not self.recording or not args or not torch.is_grad_enabled():  # training forwards only
                return
            with torch.no_grad():
                ratio = output.detach().float().norm() / args[0].detach().float().norm().clamp_min(1e-12)
            self._module_sum[path] = self._module_sum.get(path, 0.0) + ratio
            self._module_count[path] = self._module_count.get(path, 0) + 1

        return hook

    def record_ranks(self) -> None:
        """Add the Taylor score of every bottleneck unit of the bottleneck adapters from the current gradients."""
        with torch.no_grad():
            for path, adapter in self.layers.items():
                if not isinstance(adapter, BottleneckAdapter):
                    continue
                score = torch.zeros(adapter.down.out_features, device=adapter.down.weight.device)
                for param, dim in ((adapter.down.weight, 1), (adapter.down.bias, None), (adapter.up.weight, 0)):
                    if param is None or param.grad is None:
                        continue
                    product = param.grad.float() * param.float()
                    score += (product.sum(dim=dim) if dim is not None else product).abs()
                self._rank_sum[path] = self._rank_sum[path] + score if path in self._rank_sum else score
        self._rank_count += 1

    def module_scores(self) -> dict[str, float]:
        """Mean ``||adapter(x)|| / ||x||`` per adapter path over the recorded passes."""
        return {path: float(total) / self._module_count[path] for path, total in self._module_sum.items()}

    def rank_scores(self) -> dict[str, dict[str, Tensor]]:
        """Mean Taylor score per bottleneck unit: ``{path: {"adapter": scores}}`` (bottleneck adapters only)."""
        count = max(self._rank_count, 1)
        return {path: {"adapter": (s / count).cpu()} for path, s in self._rank_sum.items()}

    def state_dict(self) -> dict:
        """The accumulated sums, for checkpoints."""
        return {
            "module_sum": {k: float(v) for k, v in self._module_sum.items()},
            "module_count": dict(self._module_count),
            "rank_sum": {p: s.cpu() for p, s in self._rank_sum.items()},
            "rank_count": self._rank_count,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the sums of :meth:`state_dict`."""
        self._module_sum = {k: torch.tensor(v) for k, v in state.get("module_sum", {}).items()}
        self._module_count = dict(state.get("module_count", {}))
        self._rank_count = int(state.get("rank_count", 0))
        self._rank_sum = {
            p: s.to(self.layers[p].down.weight.device) if p in self.layers else s
            for p, s in state.get("rank_sum", {}).items()
        }
