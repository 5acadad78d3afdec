"""Trainable scalar masks over attention heads and MLP neurons (Light-PEFT's foundation masks)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_peft.pruning.surgery import AttentionSite, MlpSite, Sites

__all__ = ["PruningMasks"]


class PruningMasks(nn.Module):
    """One trainable scalar per attention head and per MLP neuron, applied by forward pre-hooks.

    A head's mask multiplies that head's slice of the input of the attention's output projection (``proj`` /
    ``o_proj`` / ``output.dense``), i.e. the head's output after attention, so it works with every attention kernel
    (fused, SDPA, flash): the kernel itself is not touched. A neuron's mask multiplies the input of the MLP's down
    projection (``fc2`` / ``down_proj``), i.e. the neuron's activation. All masks start at 1, so installing them
    leaves the model's output unchanged. With LoRA on the projection the hook sits on the peft wrapper, so the base
    weight and the adapter see the same masked input.

    The masks are ordinary parameters of this module: attached to a LightningModule before ``configure_optimizers``
    they are trained by the user's optimizer with everything else.

    Besides the mask values (the paper's magnitude score ``|m|``), the module accumulates the first-order Taylor
    importance of every mask, ``|m * dL/dm|`` -- the loss change to first order when the unit is removed -- each
    time :meth:`record_taylor` is called with the loss gradients in ``.grad``; :meth:`taylor_scores` averages them.
    After a short estimation the masks have barely left 1 (an L1 of 1e-4 moves them little), so ``|m|`` ranks
    nearly at random, while the Taylor score measures each unit's effect on the loss from the first step.

    Args:
        sites: the sites found by :func:`~lightning_peft.pruning.find_sites`.

    Example::

        >>> import timm, torch
        >>> from lightning_peft.pruning import PruningMasks, find_sites
        >>> vit = timm.create_model("vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=4, img_size=32,
        ...                         pretrained=False)
        >>> masks = PruningMasks(find_sites(vit))
        >>> x = torch.randn(1, 3, 32, 32)
        >>> before = vit(x)
        >>> masks.install()
        >>> torch.equal(vit(x), before), [tuple(m.shape) for m in masks.heads]
        (True, [(4,), (4,)])
        >>> masks.remove()
    """

    def __init__(self, sites: Sites) -> None:
        super().__init__()
        self.attention_sites: list[AttentionSite] = list(sites.attention)
        self.mlp_sites: list[MlpSite] = list(sites.mlp)
        self.heads = nn.ParameterList(nn.Parameter(torch.ones(s.num_heads)) for s in self.attention_sites)
        self.neurons = nn.ParameterList(nn.Parameter(torch.ones(s.hidden)) for s in self.mlp_sites)
        self._handles: list = []
        self._taylor: list[Tensor] = [torch.zeros(len(m)) for m in (*self.heads, *self.neurons)]
        self.taylor_count = 0

    def install(self) -> None:
        """Register the pre-hooks that apply the masks (idempotent)."""
        if self._handles:
            return
        for index, site in enumerate(self.attention_sites):
            self._handles.append(site.out_proj.register_forward_pre_hook(self._head_hook(index, site.head_dim)))
        for index, site in enumerate(self.mlp_sites):
            self._handles.append(site.out_proj.register_forward_pre_hook(self._neuron_hook(index)))

    def remove(self) -> None:
        """Remove the pre-hooks: the model computes as if every mask were 1."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _head_hook(self, index: int, head_dim: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            x, *rest = args
            mask = self.heads[index].to(x.dtype)
            return ((x.unflatten(-1, (-1, head_dim)) * mask[:, None]).flatten(-2), *rest)

        return hook

    def _neuron_hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            x, *rest = args
            return (x * self.neurons[index].to(x.dtype), *rest)

        return hook

    def l1_gradient(self, strength: float) -> None:
        """Add the gradient of ``strength * sum(|m|)`` to every mask's ``.grad`` (creating it if needed)."""
        with torch.no_grad():
            for mask in (*self.heads, *self.neurons):
                penalty = torch.sign(mask) * strength
                if mask.grad is None:
                    mask.grad = penalty
                else:
                    mask.grad.add_(penalty)

    def record_taylor(self) -> None:
        """Add ``|m * dL/dm|`` of every mask to the running sums (call with the loss gradients in ``.grad``).

        Masks without a gradient (their site did not run) add nothing; the count moves once per call.
        """
        with torch.no_grad():
            for index, mask in enumerate((*self.heads, *self.neurons)):
                if mask.grad is not None:
                    self._taylor[index] += (mask.detach() * mask.grad).abs().float().cpu()
        self.taylor_count += 1

    def taylor_scores(self) -> tuple[list[Tensor], list[Tensor]]:
        """Mean ``|m * dL/dm|`` per head and per neuron over the recorded steps: ``(heads, neurons)`` per site."""
        scores = [t / max(self.taylor_count, 1) for t in self._taylor]
        return scores[: len(self.heads)], scores[len(self.heads) :]

    def magnitude_scores(self) -> tuple[list[Tensor], list[Tensor]]:
        """``|m|`` per head and per neuron: ``(heads, neurons)`` per site."""
        return [m.detach().abs().float().cpu() for m in self.heads], [
            m.detach().abs().float().cpu() for m in self.neurons
        ]

    def spread(self) -> float:
        """Coefficient of variation (std / mean) of all mask values: how far the masks have separated.

        Near 0 the masks still sit at their initial 1 and a ranking by ``|m|`` says little about the units.
        """
        with torch.no_grad():
            values = torch.cat([m.detach().abs().float().flatten().cpu() for m in (*self.heads, *self.neurons)])
        if values.numel() < 2:
            return float("inf")
        return float(values.std() / values.mean().clamp_min(1e-12))

    def taylor_state(self) -> dict:
        """The Taylor sums and count (for a checkpoint written during estimation)."""
        return {"sums": [t.clone() for t in self._taylor], "count": self.taylor_count}

    def load_taylor_state(self, state: dict) -> None:
        """Restore :meth:`taylor_state` output (sums whose shapes do not match are ignored)."""
        sums = state.get("sums", [])
        if len(sums) == len(self._taylor) and all(a.shape == b.shape for a, b in zip(sums, self._taylor, strict=True)):
            self._taylor = [torch.as_tensor(t).float().clone() for t in sums]
            self.taylor_count = int(state.get("count", 0))

    def l1(self) -> Tensor:
        """``sum(|m|)`` over all masks (detached), for logging."""
        with torch.no_grad():
            values = [m.abs().sum() for m in (*self.heads, *self.neurons)]
            return torch.stack(values).sum() if values else torch.zeros(())
