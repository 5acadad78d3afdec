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

    def l1(self) -> Tensor:
        """``sum(|m|)`` over all masks (detached), for logging."""
        with torch.no_grad():
            values = [m.abs().sum() for m in (*self.heads, *self.neurons)]
            return torch.stack(values).sum() if values else torch.zeros(())
