"""Importance of HF peft LoRA layers and of their ranks (the cuts are in :mod:`lightning_peft.pruning.surgery`).

Light-PEFT scores a PEFT module by how much it changes its layer's output, ``||ΔW x|| / ||W x||`` (``ΔW x`` the
adapter's contribution, ``W x`` the frozen layer's, bias excluded), and each rank ``i`` of a LoRA module by the
first-order Taylor estimate of the loss change when that rank is removed: ``|Σ ∂L/∂A_i ⊙ A_i| + |Σ ∂L/∂B_i ⊙
B_i|`` (row ``i`` of ``A``, column ``i`` of ``B``). Both are averaged over the steps they are recorded on.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_peft.layout.peft_layers import base_layer_of, lora_adapters, lora_scalings
from lightning_peft.pruning.surgery import find_lora_layers

__all__ = ["LoraImportance"]


class LoraImportance:
    """Accumulates the module score and the per-rank Taylor score of every LoRA layer under a root module.

    Call :meth:`install` to start observing forward passes (the module score is recorded only while
    :attr:`recording` is True), :meth:`record_ranks` after each backward (gradients present), :meth:`remove` at the
    end. Scores are kept per ``(path, adapter)``.

    Args:
        root: the model; paths are relative to it.

    Example::

        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> net = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
        >>> importance = LoraImportance(net)
        >>> importance.install(); importance.recording = True
        >>> _ = net(torch.randn(3, 4)); importance.remove()
        >>> list(importance.module_scores())
        ['base_model.model.0']
    """

    def __init__(self, root: nn.Module) -> None:
        self.layers = find_lora_layers(root)
        self.recording = False
        self._module_sum: dict[str, Tensor] = {}
        self._module_count: dict[str, int] = {}
        self._rank_sum: dict[str, dict[str, Tensor]] = {}
        self._rank_count = 0
        self._handles: list = []
        self._base_out: dict[str, Tensor] = {}

    def install(self) -> None:
        """Register the forward hooks that measure ``||W x||`` and ``||ΔW x||`` (idempotent)."""
        if self._handles:
            return
        for path, layer in self.layers.items():
            base = base_layer_of(layer)
            self._handles.append(base.register_forward_hook(self._base_hook(path, base)))
            for adapter, (_, lora_b) in lora_adapters(layer).items():
                self._handles.append(lora_b.register_forward_hook(self._delta_hook(path, layer, adapter)))

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._base_out.clear()

    def _base_hook(self, path: str, base: nn.Module):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            # training forwards only: another method's scoring pass (IST, under no_grad) is not a sample
            if self.recording and torch.is_grad_enabled():
                with torch.no_grad():
                    bias = base.bias
                    if bias is not None and isinstance(base, nn.Conv2d):  # channels first
                        bias = bias[:, None, None]
                    out = output if bias is None else output - bias.to(output.dtype)
                    self._base_out[path] = out.detach().float().norm()

        return hook

    def _delta_hook(self, path: str, layer: nn.Module, adapter: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            base_norm = self._base_out.get(path)
            if not self.recording or base_norm is None or not torch.is_grad_enabled():
                return
            with torch.no_grad():
                scaling = abs(float(lora_scalings(layer)[adapter]))
                ratio = (output.detach().float().norm() * scaling) / base_norm.clamp_min(1e-12)
            key = f"{path}::{adapter}"
            self._module_sum[key] = self._module_sum.get(key, 0.0) + ratio
            self._module_count[key] = self._module_count.get(key, 0) + 1

        return hook

    def record_ranks(self) -> None:
        """Add the Taylor score of every rank from the current gradients (layers without gradients add 0)."""
        with torch.no_grad():
            for path, layer in self.layers.items():
                sums = self._rank_sum.setdefault(path, {})
                for adapter, (lora_a, lora_b) in lora_adapters(layer).items():
                    a, b = lora_a.weight, lora_b.weight
                    score = torch.zeros(a.shape[0], device=a.device)
                    # rank i: row i of A, column i of B (convolution kernels summed too)
                    if a.grad is not None:
                        score += (a.grad.float() * a.float()).flatten(1).sum(dim=1).abs()
                    if b.grad is not None:
                        score += (b.grad.float() * b.float()).transpose(0, 1).flatten(1).sum(dim=1).abs()
                    sums[adapter] = sums[adapter] + score if adapter in sums else score
        self._rank_count += 1

    def module_scores(self) -> dict[str, float]:
        """Mean ``||ΔW x|| / ||W x||`` per layer path (the mean over its adapters), over the recorded passes."""
        per_path: dict[str, list[float]] = {}
        for key, total in self._module_sum.items():
            path = key.split("::", 1)[0]
            per_path.setdefault(path, []).append(float(total) / self._module_count[key])
        return {path: sum(v) / len(v) for path, v in per_path.items()}

    def rank_scores(self) -> dict[str, dict[str, Tensor]]:
        """Mean Taylor score per rank: ``{path: {adapter: scores of shape (r,)}}``."""
        count = max(self._rank_count, 1)
        return {p: {a: (s / count).cpu() for a, s in d.items()} for p, d in self._rank_sum.items()}

    def state_dict(self) -> dict:
        """The accumulated sums, for checkpoints."""
        return {
            "module_sum": {k: float(v) for k, v in self._module_sum.items()},
            "module_count": dict(self._module_count),
            "rank_sum": {p: {a: s.cpu() for a, s in d.items()} for p, d in self._rank_sum.items()},
            "rank_count": self._rank_count,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the sums of :meth:`state_dict`."""
        self._module_sum = {k: torch.tensor(v) for k, v in state.get("module_sum", {}).items()}
        self._module_count = dict(state.get("module_count", {}))
        self._rank_count = int(state.get("rank_count", 0))
        self._rank_sum = {}
        for path, adapters in state.get("rank_sum", {}).items():
            layer = self.layers.get(path)
            device = lora_adapters(layer)[next(iter(adapters))][0].weight.device if layer is not None else "cpu"
            self._rank_sum[path] = {a: s.to(device) for a, s in adapters.items()}
