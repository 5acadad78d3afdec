"""What HF peft's LoRA layers look like: the one place that reads peft's attribute names.

peft wraps a targeted layer in a LoRA layer that keeps the original as ``base_layer`` and holds, per adapter name,
a down projection in ``lora_A[adapter]``, an up projection in ``lora_B[adapter]``, the rank in ``r[adapter]`` and
the output factor in ``scaling[adapter]`` (DoRA adds ``lora_magnitude_vector``, LoRA on embeddings
``lora_embedding_A`` / ``_B``). Code that looks inside such a layer asks these functions instead of spelling the
names, so a peft release that renames them is fixed here. The module imports nothing from peft (a model without
LoRA never needs it) and nothing from the rest of the package, so every package can use it.

Example::

    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> net = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    >>> [(path, lora_rank(layer, "default")) for path, layer in lora_layers(net).items()]
    [('base_model.model.0', 2)]
    >>> type(base_layer_of(net.base_model.model[0])).__name__
    'Linear'
"""

from __future__ import annotations

from torch import nn

__all__ = [
    "PEFT_COMPONENTS",
    "PEFT_WRAPPERS",
    "base_layer_of",
    "is_lora_layer",
    "lora_adapters",
    "lora_layers",
    "lora_rank",
    "lora_ranks",
    "lora_scalings",
    "lora_slots",
    "set_lora_rank",
    "set_lora_scalings",
    "uses_dora",
]

# Path components peft inserts between a wrapped layer and its parameters (lower case), e.g. ``q.lora_A.default``.
PEFT_COMPONENTS = frozenset(
    {"base_layer", "lora_a", "lora_b", "lora_embedding_a", "lora_embedding_b", "lora_magnitude_vector"}
)
# Path components of peft's ``modules_to_save`` wrapper (a trained copy beside the original).
PEFT_WRAPPERS = frozenset({"modules_to_save", "original_module"})


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a peft LoRA layer (a ``base_layer`` and a ``lora_A`` ModuleDict)."""
    return hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)


def base_layer_of(module: nn.Module) -> nn.Module:
    """The layer under a peft wrapper (``module`` itself when it is not wrapped)."""
    return getattr(module, "base_layer", module)


def lora_layers(root: nn.Module) -> dict[str, nn.Module]:
    """``{path: layer}`` of every peft LoRA layer under ``root`` that holds at least one adapter, in module order."""
    return {name: m for name, m in root.named_modules() if is_lora_layer(m) and len(m.lora_A) > 0}


def lora_adapters(layer: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """``{adapter name: (A, B)}`` of a LoRA layer: ``A`` maps the input to the rank, ``B`` the rank to the output."""
    return {adapter: (lora_a, layer.lora_B[adapter]) for adapter, lora_a in layer.lora_A.items()}


def lora_slots(layer: nn.Module, adapter: str) -> list[tuple[nn.Module, str]]:
    """Where ``adapter``'s ``A`` and ``B`` are held, as ``(owner, name)`` (``getattr(owner, name)`` is the module).

    For code that puts another module in their place for a while (a copy to cut on) and back afterwards.
    """
    return [(layer.lora_A, adapter), (layer.lora_B, adapter)]


def lora_rank(layer: nn.Module, adapter: str) -> int:
    """The rank of ``adapter`` in a LoRA layer."""
    return int(layer.r[adapter])


def lora_ranks(layer: nn.Module) -> dict[str, int]:
    """``{adapter: rank}`` of a LoRA layer."""
    return {adapter: int(r) for adapter, r in layer.r.items()}


def set_lora_rank(layer: nn.Module, adapter: str, rank: int) -> None:
    """Record a new rank of ``adapter`` (after its ``A`` / ``B`` were sliced)."""
    layer.r[adapter] = int(rank)


def lora_scalings(layer: nn.Module) -> dict[str, float]:
    """``{adapter: factor}`` multiplying each adapter's output (``lora_alpha / r`` unless peft was told otherwise)."""
    return dict(layer.scaling)


def set_lora_scalings(layer: nn.Module, scalings: dict[str, float]) -> None:
    """Set the output factor of the adapters named in ``scalings`` (0 switches an adapter off, exactly)."""
    layer.scaling.update(scalings)


def uses_dora(layer: nn.Module) -> bool:
    """Whether any adapter of a LoRA layer is DoRA (weight-decomposed: a magnitude vector over the output)."""
    return any(getattr(layer, "use_dora", {}).values())
