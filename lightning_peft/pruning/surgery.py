"""Physical pruning: every cut of the package -- attention heads, MLP neurons, LoRA ranks and layers, adapters.

A *site* is one place that can shrink: an attention module (its heads) or an MLP (its hidden neurons). The sites
come from the layout registry (:func:`lightning_peft.layout.block_anatomy`) over every block of every stack that
:func:`lightning_peft.layout.find_blocks` finds — self- and cross-attention of encoders and decoders included — so
this module holds no family knowledge: it slices what the registry describes (separate or fused ``[q | k | v]``
projections, ``Linear`` or transformers ``Conv1D``, per-head extras such as relative-position bias tables and
separate q/k/v biases; gated, plain or fused ``gate_up`` MLPs).

Every projection may be wrapped by an HF peft LoRA layer: slicing the base weight slices the matching side of each
adapter (``lora_B`` rows for output features, ``lora_A`` columns for input features), so a LoRA-adapted model
shrinks exactly like a plain one. The PEFT modules themselves are cut here too: ranks of a LoRA layer
(:func:`prune_lora_ranks`), a whole LoRA layer (:func:`remove_lora`), bottleneck units of an adapter of
:mod:`lightning_peft.adapters` (:func:`prune_adapter_units`) and a whole adapter (:func:`remove_adapter`). What peft
calls its parts is read through :mod:`lightning_peft.layout.peft_layers`.

With grouped-query attention (fewer key/value heads than query heads) the unit that can be removed is a whole
key/value group: one key/value head and the query heads that share it. Removing groups keeps the number of query
heads per group unchanged, so the attention kernels need no change. For ordinary multi-head attention a group is
one head.

Every replaced parameter is recorded in a :class:`ParameterReplacements`, from which the optimizer's state moves to
the smaller parameters (:func:`lightning_peft.pruning.carry_over.replace_in_optimizer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_peft.adapters import Adapter, BottleneckAdapter
from lightning_peft.layout import AttentionSite, MlpSite, block_anatomy, find_blocks, is_projection
from lightning_peft.layout.anatomy import _is_conv1d
from lightning_peft.layout.peft_layers import (
    base_layer_of,
    is_lora_layer,
    lora_adapters,
    lora_layers,
    lora_rank,
    set_lora_rank,
    uses_dora,
)

__all__ = [
    "AttentionSite",
    "MlpSite",
    "ParameterReplacements",
    "Sites",
    "find_lora_layers",
    "find_sites",
    "prune_adapter_units",
    "prune_attention",
    "prune_linear",
    "prune_lora_ranks",
    "prune_mlp",
    "remove_adapter",
    "remove_lora",
]


@dataclass
class Sites:
    """The prunable sites of a model, in block order, and what could not be pruned (``(path, reason)``)."""

    attention: list[AttentionSite] = field(default_factory=list)
    mlp: list[MlpSite] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def find_sites(root: nn.Module, layers: str | Sequence[str] | None = None) -> Sites:
    """Find the prunable attention modules and MLPs inside every block of ``root``.

    Args:
        root: the model (or LightningModule) to search; site paths are relative to it.
        layers: block container path(s), passed to :func:`~lightning_peft.layout.find_blocks`.

    Returns:
        The sites, in block order; ``skipped`` names every attention or MLP that cannot be pruned and why (a layout
        the registry does not know, a norm over all heads, a position bias shared across layers, shared weights).

    Example::

        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=4, pretrained=False)
        >>> sites = find_sites(vit)
        >>> [(s.path, s.num_heads) for s in sites.attention]
        [('blocks.0.attn', 4), ('blocks.1.attn', 4)]
    """
    stack = find_blocks(root, layers)
    sites = Sites()
    if stack.shared is not None:
        sites.skipped.append((stack.path, f"{stack.shared}; pruning one use would prune them all"))
        return sites
    for index, (name, block) in enumerate(zip(stack.names, stack.blocks, strict=True)):
        anatomy = block_anatomy(block, name, index)
        for site in anatomy.attention:
            if site.problem is None:
                sites.attention.append(site)
            else:
                sites.skipped.append((site.path, f"attention heads: {site.problem}"))
        sites.mlp.extend(anatomy.mlp)
        sites.skipped.extend(anatomy.unrecognised)
    return sites


class ParameterReplacements:
    """Records which parameters the surgery replaced by smaller ones (and how), or removed.

    Used to carry the optimizer's state over to the new parameters (:func:`replace_in_optimizer`).
    """

    def __init__(self) -> None:
        # id(current parameter) -> (original parameter, [(dim, kept indices), ...], current parameter)
        self._entries: dict[int, tuple[nn.Parameter, list[tuple[int, Tensor]], nn.Parameter]] = {}
        self.removed: dict[int, nn.Parameter] = {}

    def replace(self, old: nn.Parameter, new: nn.Parameter, dim: int, index: Tensor) -> None:
        """Record that ``new`` is ``old`` sliced to ``index`` along ``dim``."""
        original, ops, _ = self._entries.pop(id(old), (old, [], old))
        self._entries[id(new)] = (original, [*ops, (dim, index)], new)

    def remove(self, param: nn.Parameter) -> None:
        """Record that ``param`` (or what replaced it) left the model."""
        original, _, _ = self._entries.pop(id(param), (param, [], param))
        self.removed[id(original)] = original

    def mapping(self) -> dict[int, tuple[nn.Parameter, list[tuple[int, Tensor]]]]:
        """``id(original) -> (new parameter, slicing ops)`` for every replaced parameter."""
        return {id(orig): (new, ops) for orig, ops, new in self._entries.values()}


def _sliced_parameter(param: nn.Parameter, dim: int, index: Tensor) -> nn.Parameter:
    data = param.detach().index_select(dim, index.to(param.device)).clone()
    return nn.Parameter(data, requires_grad=param.requires_grad)


def _slice_attr(module: nn.Module, name: str, dim: int, index: Tensor, record: ParameterReplacements | None) -> None:
    old = getattr(module, name, None)
    if old is None:
        return
    if not isinstance(old, nn.Parameter):  # a buffer (BEiT's zero k_bias): assigning a tensor replaces the buffer
        setattr(module, name, old.index_select(dim, index.to(old.device)).clone())
        return
    new = _sliced_parameter(old, dim, index)
    setattr(module, name, new)
    if record is not None:
        record.replace(old, new, dim, index)


def prune_linear(module: nn.Module, index: Tensor, side: str, record: ParameterReplacements | None = None) -> None:
    """Keep only the output (``side="out"``) or input (``side="in"``) features ``index`` of a projection, in place.

    The projection is an ``nn.Linear`` or a transformers ``Conv1D`` (weight stored as ``(in, out)``), possibly
    wrapped by HF peft LoRA. The module object stays the same (hooks and references held by other callbacks remain
    valid); its weight (and bias, for output features) become new, smaller parameters. A LoRA wrapper is sliced on the
    same side: ``lora_B`` rows for output features, ``lora_A`` columns for input features.

    Raises:
        ValueError: for a DoRA-adapted layer (its magnitude vector has no sliced form here) or a bad ``side``.
    """
    if side not in ("out", "in"):
        raise ValueError(f"`side` must be 'out' or 'in', got {side!r}.")
    index = torch.as_tensor(index, dtype=torch.long)
    base = base_layer_of(module)
    conv1d = _is_conv1d(base)
    if side == "out":
        _slice_attr(base, "weight", 1 if conv1d else 0, index, record)
        _slice_attr(base, "bias", 0, index, record)
        if conv1d:
            base.nf = len(index)
        else:
            base.out_features = len(index)
    else:
        _slice_attr(base, "weight", 0 if conv1d else 1, index, record)
        if conv1d:
            base.nx = len(index)
        else:
            base.in_features = len(index)
    if not is_lora_layer(module):
        return
    if uses_dora(module):
        raise ValueError(
            f"cannot prune a DoRA-adapted layer ({type(module).__name__}). HINT: use plain LoRA (`use_dora=False`)"
            " with EarlyPruning."
        )
    for lora_a, lora_b in lora_adapters(module).values():
        if side == "out":
            _slice_attr(lora_b, "weight", 0, index, record)
            _slice_attr(lora_b, "bias", 0, index, record)
            lora_b.out_features = len(index)
        else:
            _slice_attr(lora_a, "weight", 1, index, record)
            lora_a.in_features = len(index)
    if side == "out":
        module.out_features = len(index)
    else:
        module.in_features = len(index)


def _feature_index(units: Sequence[int], width: int) -> Tensor:
    """Indices of the features of the kept ``units`` (heads) of ``width`` features each."""
    units = torch.as_tensor(list(units), dtype=torch.long)
    return (units[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


# Attributes of attention modules that hold the head counts / the concatenated heads' width (set when present).
_HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_COUNTS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_WIDTHS = ("all_head_size", "all_head_dim", "inner_dim", "attn_dim", "split_size")


def prune_attention(
    site: AttentionSite, kept_heads: Sequence[int], record: ParameterReplacements | None = None
) -> None:
    """Keep only the query heads ``kept_heads`` of an attention site, in place, keeping its head counts consistent.

    With grouped-query attention ``kept_heads`` must consist of whole key/value groups (see the module docstring).

    Raises:
        ValueError: if ``kept_heads`` is empty, out of range, or splits a key/value group, or if the site cannot be
            pruned (:attr:`AttentionSite.problem`).
    """
    if site.problem is not None:
        raise ValueError(f"the heads of {site.path!r} cannot be pruned: {site.problem}.")
    kept = sorted(int(h) for h in kept_heads)
    if not kept or kept[0] < 0 or kept[-1] >= site.num_heads or len(set(kept)) != len(kept):
        raise ValueError(
            f"`kept_heads` of {site.path!r} must be distinct heads in [0, {site.num_heads}), at least one, got {kept}."
        )
    group = site.group_size
    kv_kept = sorted({h // group for h in kept})
    if len(kept) != len(kv_kept) * group:
        raise ValueError(
            f"`kept_heads` of {site.path!r} must keep whole key/value groups of {group} query heads, got {kept}."
            " HINT: with grouped-query attention keep or prune all query heads of a group together."
        )
    d = site.head_dim
    q_index = _feature_index(kept, d)
    kv_index = _feature_index(kv_kept, d)
    old_width = site.num_heads * d
    if site.qkv is not None:
        kv_width = site.num_kv_heads * d
        prune_linear(
            site.qkv, torch.cat([q_index, old_width + kv_index, old_width + kv_width + kv_index]), "out", record
        )
    else:
        prune_linear(site.q, q_index, "out", record)
        prune_linear(site.k, kv_index, "out", record)
        prune_linear(site.v, kv_index, "out", record)
    for owner, name, dim, kind in site.extras:
        index = {"heads": torch.as_tensor(kept), "q": q_index, "kv": kv_index}[kind]
        _slice_attr(owner, name, dim, index, record)
    gate = getattr(site.module, "gate", None)  # timm attention gates (one output per head feature)
    if gate is not None and site.qkv is not None and isinstance(base_layer_of(gate), nn.Linear):
        prune_linear(gate, q_index, "out", record)
    module = site.module
    for name in _HEAD_COUNTS:
        if getattr(module, name, None) == site.num_heads:
            setattr(module, name, len(kept))
    for name in _KV_COUNTS:
        if getattr(module, name, None) == site.num_kv_heads:
            setattr(module, name, len(kv_kept))
    for name in _WIDTHS:
        if getattr(module, name, None) == old_width:
            setattr(module, name, len(kept) * d)
    prune_linear(site.o, q_index, "in", record)
    site.num_heads = len(kept)
    site.num_kv_heads = len(kv_kept)


def prune_mlp(site: MlpSite, kept_neurons: Sequence[int], record: ParameterReplacements | None = None) -> None:
    """Keep only the hidden neurons ``kept_neurons`` of an MLP site, in place.

    Raises:
        ValueError: if ``kept_neurons`` is empty or out of range.
    """
    hidden = site.hidden
    kept = sorted(int(i) for i in kept_neurons)
    if not kept or kept[0] < 0 or kept[-1] >= hidden or len(set(kept)) != len(kept):
        raise ValueError(
            f"`kept_neurons` of {site.path!r} must be distinct neurons in [0, {hidden}), at least one, got"
            f" {len(kept)} values."
        )
    index = torch.as_tensor(kept, dtype=torch.long)
    for proj in (*site.gate, *site.up):
        prune_linear(proj, index, "out", record)
    if site.fused is not None:  # [gate | up] halves in one projection
        prune_linear(site.fused, torch.cat([index, hidden + index]), "out", record)
    prune_linear(site.down, index, "in", record)
    for name in ("intermediate_size", "hidden_features", "intermediate_dim"):
        if site.owner is not None and getattr(site.owner, name, None) == hidden:
            setattr(site.owner, name, len(kept))


# ------------------------------------------------------------------------------------------------ PEFT modules


def find_lora_layers(root: nn.Module) -> dict[str, nn.Module]:
    """``{path: module}`` of every HF peft LoRA layer under ``root`` that holds at least one adapter.

    Counted: LoRA on ``nn.Linear``, transformers ``Conv1D`` (GPT-2) and ``nn.Conv2d`` (their ``A`` / ``B`` keep the
    rank in the same dimensions). LoRA on embeddings is neither scored nor pruned.
    """
    return {
        path: layer
        for path, layer in lora_layers(root).items()
        if is_projection(base_layer_of(layer)) or isinstance(base_layer_of(layer), nn.Conv2d)
    }


def _kept_index(kept: Sequence[int], width: int, what: str) -> Tensor:
    index = torch.as_tensor(sorted(int(i) for i in kept), dtype=torch.long)
    if len(index) == 0 or index[0] < 0 or index[-1] >= width:
        raise ValueError(f"`kept` {what} must be in [0, {width}) and at least one, got {index.tolist()}.")
    return index


def _detach_module(root: nn.Module, path: str, replacement: nn.Module | None) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if replacement is None:
        delattr(parent, child)
    else:
        setattr(parent, child, replacement)


def prune_lora_ranks(
    layer: nn.Module, adapter: str, kept: Sequence[int], record: ParameterReplacements | None = None
) -> None:
    """Keep only the ranks ``kept`` of ``adapter`` in a peft LoRA layer: rows of ``A``, columns of ``B``.

    The scaling is left as it is (not recomputed from the new rank), so the kept ranks contribute exactly what they
    did before.
    """
    index = _kept_index(kept, lora_rank(layer, adapter), "ranks")
    lora_a, lora_b = lora_adapters(layer)[adapter]
    _slice_attr(lora_a, "weight", 0, index, record)
    _slice_attr(lora_b, "weight", 1, index, record)
    for module, attr in (
        (lora_a, "out_features"),
        (lora_a, "out_channels"),
        (lora_b, "in_features"),
        (lora_b, "in_channels"),
    ):
        if hasattr(module, attr):
            setattr(module, attr, len(index))
    set_lora_rank(layer, adapter, len(index))


def remove_lora(root: nn.Module, path: str, record: ParameterReplacements | None = None) -> None:
    """Replace the peft LoRA layer at ``path`` by its base Linear (the adapters' parameters leave the model)."""
    layer = root.get_submodule(path)
    base = base_layer_of(layer)
    if record is not None:
        kept = {id(p) for p in base.parameters()}
        for param in layer.parameters():
            if id(param) not in kept:
                record.remove(param)
    _detach_module(root, path, base)


def prune_adapter_units(
    adapter: BottleneckAdapter, kept: Sequence[int], record: ParameterReplacements | None = None
) -> None:
    """Keep only the bottleneck units ``kept`` of a bottleneck adapter (rows of ``down``, columns of ``up``)."""
    if not isinstance(adapter, BottleneckAdapter):
        raise ValueError(
            f"only bottleneck adapters have prunable units, got {type(adapter).__name__}."
            " HINT: set `peft_rank_ratio=0` or use BOTTLENECK adapters."
        )
    index = _kept_index(kept, adapter.down.out_features, "units")
    prune_linear(adapter.down, index, "out", record)
    prune_linear(adapter.up, index, "in", record)


def remove_adapter(root: nn.Module, path: str, record: ParameterReplacements | None = None) -> None:
    """Take the adapter at ``path`` out of ``root``: its hooks are unregistered and the module deleted."""
    adapter: Adapter = root.get_submodule(path)
    for handle in getattr(adapter, "hook_handles", []):
        handle.remove()
    adapter.hook_handles = []
    if record is not None:
        for param in adapter.parameters():
            record.remove(param)
    _detach_module(root, path, None)
