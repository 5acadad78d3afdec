"""Physical pruning: find the attention heads and MLP neurons of a model and slice its Linear layers.

A *site* is one place that can shrink: an attention module (its heads) or an MLP (its hidden neurons). Sites are
found inside the blocks of :func:`lightning_peft.layers.find_layers`, by the layouts the supported families use:

========================  ==============================================  ============================================
family                    attention (heads)                               MLP (neurons)
========================  ==============================================  ============================================
timm ViT / DeiT / AST     ``attn.qkv`` (fused), ``attn.proj``             ``mlp.fc1`` -> ``mlp.fc2``
                          (``num_heads``, ``head_dim``, ``attn_dim``)     (timm ``SwiGLU``: ``fc1_g``, ``fc1_x``)
HF ViT / AST (v5), Llama  ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``  ``mlp.fc1`` -> ``mlp.fc2``;
                          (``head_dim``; grouped-query attention)         ``gate_proj``, ``up_proj`` -> ``down_proj``
HF BERT-style encoders    ``attention.self.{query,key,value}``,           ``intermediate.dense`` -> ``output.dense``
                          ``attention.output.dense``
========================  ==============================================  ============================================

Every Linear may be wrapped by an HF peft LoRA layer: slicing the base weight slices the matching side of each
adapter (``lora_B`` rows for output features, ``lora_A`` columns for input features), so a LoRA-adapted model
shrinks exactly like a plain one.

With grouped-query attention (fewer key/value heads than query heads) the unit that can be removed is a whole
key/value group: one key/value head and the query heads that share it. Removing groups keeps the number of query
heads per group unchanged (``num_key_value_groups``), so the attention kernels need no change; pruning query heads
inside groups instead would leave the groups unequal, which no kernel supports. For ordinary multi-head attention a
group is one head.

Every replaced parameter is recorded in a :class:`ParameterReplacements`, which moves the optimizer's state to the
smaller parameters (:func:`replace_in_optimizer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_peft.layers import find_layers

__all__ = [
    "AttentionSite",
    "MlpSite",
    "ParameterReplacements",
    "find_sites",
    "prune_attention",
    "prune_linear",
    "prune_mlp",
    "replace_in_optimizer",
]


def _base(module: nn.Module) -> nn.Module:
    """The Linear under an HF peft wrapper (or the module itself)."""
    return getattr(module, "base_layer", module)


def _is_linear(module: nn.Module | None) -> bool:
    return module is not None and isinstance(_base(module), nn.Linear)


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)


@dataclass
class AttentionSite:
    """An attention module whose heads can be pruned.

    Attributes:
        path: dotted name of the attention module under the root given to :func:`find_sites`.
        block: index of the block in the layer stack.
        kind: ``"fused"`` (timm ``qkv``), ``"separate"`` (``q_proj``/``k_proj``/``v_proj``/``o_proj``) or ``"bert"``.
        module: the attention module (for ``"bert"``, the self-attention module holding query/key/value).
        out_proj: the Linear (maybe LoRA-wrapped) that receives the concatenated head outputs.
        num_heads: number of query heads.
        num_kv_heads: number of key/value heads (equal to ``num_heads`` without grouped-query attention).
        head_dim: features per head.
    """

    path: str
    block: int
    kind: str
    module: nn.Module
    out_proj: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads


@dataclass
class MlpSite:
    """An MLP whose hidden neurons can be pruned.

    Attributes:
        path: dotted name of the module holding the MLP's layers (the block itself for BERT-style layers).
        block: index of the block in the layer stack.
        in_projs: the Linears producing the hidden features (``fc1``; ``gate_proj`` and ``up_proj``), output-sliced.
        out_proj: the Linear consuming them (``fc2`` / ``down_proj``), input-sliced.
        owner: the module whose ``intermediate_size`` / ``hidden_features`` attribute is kept in step, if any.
    """

    path: str
    block: int
    in_projs: list[nn.Module]
    out_proj: nn.Module
    owner: nn.Module | None = None

    @property
    def hidden(self) -> int:
        """Current number of hidden neurons."""
        return _base(self.out_proj).in_features


@dataclass
class Sites:
    """The prunable sites of a model, in block order."""

    attention: list[AttentionSite] = field(default_factory=list)
    mlp: list[MlpSite] = field(default_factory=list)


def _attention_site(path: str, block: int, module: nn.Module, parent: nn.Module | None) -> AttentionSite | None:
    if all(_is_linear(getattr(module, n, None)) for n in ("qkv", "proj")) and hasattr(module, "num_heads"):
        if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
            return None  # a norm over all heads' features (scale_norm) would change when heads go: not prunable
        heads, head_dim = int(module.num_heads), int(module.head_dim)
        return AttentionSite(path, block, "fused", module, module.proj, heads, heads, head_dim)
    if all(_is_linear(getattr(module, n, None)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        head_dim = int(getattr(module, "head_dim", 0))
        if head_dim <= 0:
            return None
        heads = _base(module.q_proj).out_features // head_dim
        kv_heads = _base(module.k_proj).out_features // head_dim
        if heads % kv_heads:
            return None
        return AttentionSite(path, block, "separate", module, module.o_proj, heads, kv_heads, head_dim)
    if all(_is_linear(getattr(module, n, None)) for n in ("query", "key", "value")) and hasattr(
        module, "attention_head_size"
    ):
        out_proj = getattr(getattr(parent, "output", None), "dense", None)
        if not _is_linear(out_proj):
            return None
        heads, head_dim = int(module.num_attention_heads), int(module.attention_head_size)
        return AttentionSite(path, block, "bert", module, out_proj, heads, heads, head_dim)
    return None


def _mlp_site(path: str, block: int, module: nn.Module) -> MlpSite | None:
    if type(module).__name__ == "GluMlp":  # fc1 holds both GLU halves in one chunked output: not handled
        return None
    if _is_linear(getattr(module, "fc1", None)) and _is_linear(getattr(module, "fc2", None)):
        if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
            return None
        return MlpSite(path, block, [module.fc1], module.fc2, module)
    if all(_is_linear(getattr(module, n, None)) for n in ("fc1_g", "fc1_x", "fc2")):
        if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
            return None
        return MlpSite(path, block, [module.fc1_g, module.fc1_x], module.fc2, module)
    if all(_is_linear(getattr(module, n, None)) for n in ("gate_proj", "up_proj", "down_proj")):
        return MlpSite(path, block, [module.gate_proj, module.up_proj], module.down_proj, module)
    intermediate = getattr(module, "intermediate", None)
    output = getattr(module, "output", None)
    if _is_linear(getattr(intermediate, "dense", None)) and _is_linear(getattr(output, "dense", None)):
        return MlpSite(path, block, [intermediate.dense], output.dense, None)
    return None


def find_sites(root: nn.Module, layers: str | None = None) -> Sites:
    """Find the prunable attention modules and MLPs inside the blocks of ``root``.

    Args:
        root: the model (or LightningModule) to search; site paths are relative to it.
        layers: dotted path of the block container, passed to :func:`~lightning_peft.layers.find_layers`.

    Returns:
        The sites, in block order. Blocks of a layout not in the table of this module contribute none.

    Example::

        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=4, pretrained=False)
        >>> sites = find_sites(vit)
        >>> [(s.path, s.num_heads) for s in sites.attention]
        [('blocks.0.attn', 4), ('blocks.1.attn', 4)]
    """
    stack = find_layers(root, layers)
    names = {id(m): n for n, m in root.named_modules()}
    sites = Sites()
    for index, block in enumerate(stack.blocks):
        parents = {id(child): parent for parent in block.modules() for child in parent.children()}
        seen_mlp: set[int] = set()
        for module in block.modules():
            path = names[id(module)]
            if _is_lora(module) or isinstance(module, nn.Linear):
                continue
            attention = _attention_site(path, index, module, parents.get(id(module)))
            if attention is not None:
                sites.attention.append(attention)
                continue
            mlp = _mlp_site(path, index, module)
            if mlp is not None and id(mlp.out_proj) not in seen_mlp:
                seen_mlp.add(id(mlp.out_proj))
                sites.mlp.append(mlp)
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
    new = _sliced_parameter(old, dim, index)
    setattr(module, name, new)
    if record is not None:
        record.replace(old, new, dim, index)


def prune_linear(module: nn.Module, index: Tensor, side: str, record: ParameterReplacements | None = None) -> None:
    """Keep only the output (``side="out"``) or input (``side="in"``) features ``index`` of a Linear, in place.

    The module object stays the same (hooks and references held by other callbacks remain valid); its weight (and
    bias, for output features) become new, smaller parameters. An HF peft LoRA wrapper is sliced on the same side:
    ``lora_B`` rows for output features, ``lora_A`` columns for input features.

    Raises:
        ValueError: for a DoRA-adapted layer (its magnitude vector has no sliced form here) or a bad ``side``.
    """
    if side not in ("out", "in"):
        raise ValueError(f"`side` must be 'out' or 'in', got {side!r}.")
    index = torch.as_tensor(index, dtype=torch.long)
    base = _base(module)
    if side == "out":
        _slice_attr(base, "weight", 0, index, record)
        _slice_attr(base, "bias", 0, index, record)
        base.out_features = len(index)
    else:
        _slice_attr(base, "weight", 1, index, record)
        base.in_features = len(index)
    if not _is_lora(module):
        return
    if any(getattr(module, "use_dora", {}).values()):
        raise ValueError(
            f"cannot prune a DoRA-adapted layer ({type(module).__name__}). HINT: use plain LoRA (`use_dora=False`)"
            " with EarlyPruning."
        )
    for adapter in module.lora_A:
        if side == "out":
            lora_b = module.lora_B[adapter]
            _slice_attr(lora_b, "weight", 0, index, record)
            _slice_attr(lora_b, "bias", 0, index, record)
            lora_b.out_features = len(index)
        else:
            lora_a = module.lora_A[adapter]
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


def prune_attention(
    site: AttentionSite, kept_heads: Sequence[int], record: ParameterReplacements | None = None
) -> None:
    """Keep only the query heads ``kept_heads`` of an attention site, in place, keeping its head counts consistent.

    With grouped-query attention ``kept_heads`` must consist of whole key/value groups (see the module docstring).

    Raises:
        ValueError: if ``kept_heads`` is empty, out of range, or splits a key/value group.
    """
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
    module = site.module
    if site.kind == "fused":
        width = site.num_heads * d
        qkv_index = torch.cat([q_index + i * width for i in range(3)])
        prune_linear(module.qkv, qkv_index, "out", record)
        gate = getattr(module, "gate", None)
        if gate is not None and _is_linear(gate):
            prune_linear(gate, q_index, "out", record)
        module.num_heads = len(kept)
        if hasattr(module, "attn_dim"):
            module.attn_dim = len(kept) * d
    elif site.kind == "separate":
        kv_index = _feature_index(kv_kept, d)
        prune_linear(module.q_proj, q_index, "out", record)
        prune_linear(module.k_proj, kv_index, "out", record)
        prune_linear(module.v_proj, kv_index, "out", record)
        for name, value in (("num_heads", len(kept)), ("num_attention_heads", len(kept))):
            if hasattr(module, name):
                setattr(module, name, value)
        if hasattr(module, "num_key_value_heads"):
            module.num_key_value_heads = len(kv_kept)
    else:
        prune_linear(module.query, q_index, "out", record)
        prune_linear(module.key, q_index, "out", record)
        prune_linear(module.value, q_index, "out", record)
        module.num_attention_heads = len(kept)
        module.all_head_size = len(kept) * d
    prune_linear(site.out_proj, q_index, "in", record)
    site.num_heads = len(kept)
    site.num_kv_heads = len(kv_kept)


def prune_mlp(site: MlpSite, kept_neurons: Sequence[int], record: ParameterReplacements | None = None) -> None:
    """Keep only the hidden neurons ``kept_neurons`` of an MLP site, in place.

    Raises:
        ValueError: if ``kept_neurons`` is empty or out of range.
    """
    kept = sorted(int(i) for i in kept_neurons)
    if not kept or kept[0] < 0 or kept[-1] >= site.hidden or len(set(kept)) != len(kept):
        raise ValueError(
            f"`kept_neurons` of {site.path!r} must be distinct neurons in [0, {site.hidden}), at least one, got"
            f" {len(kept)} values."
        )
    index = torch.as_tensor(kept, dtype=torch.long)
    for proj in site.in_projs:
        prune_linear(proj, index, "out", record)
    prune_linear(site.out_proj, index, "in", record)
    for name in ("intermediate_size", "hidden_features"):
        if site.owner is not None and isinstance(getattr(site.owner, name, None), int):
            setattr(site.owner, name, len(kept))


def _slice_state(state: dict, shape: torch.Size, ops: list[tuple[int, Tensor]]) -> dict | None:
    new = {}
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == shape and value.dim() > 0:
            for dim, index in ops:
                value = value.index_select(dim, index.to(value.device))
            new[key] = value.clone()
        elif isinstance(value, Tensor) and value.numel() > 1:
            return None  # a layout we cannot slice (e.g. block-wise quantized state): start fresh
        else:
            new[key] = value
    return new


def replace_in_optimizer(
    optimizer: torch.optim.Optimizer, record: ParameterReplacements, drop: Sequence[Tensor] = ()
) -> None:
    """Point ``optimizer`` at the pruned parameters, keeping the state of the surviving slices.

    Param groups are edited in place (never added or removed), so LR schedulers holding this optimizer keep working.
    State tensors shaped like the parameter (Adam's ``exp_avg`` / ``exp_avg_sq``, momentum buffers) are sliced like
    it; scalar state (``step``) is kept; state of another layout (8-bit block-wise) is dropped, so that parameter
    restarts with fresh state. Parameters in ``drop`` or recorded as removed leave the groups with their state.
    """
    mapping = record.mapping()
    gone = {id(p) for p in drop} | set(record.removed)
    for group in optimizer.param_groups:
        params = []
        for param in group["params"]:
            if id(param) in gone:
                optimizer.state.pop(param, None)
                continue
            if id(param) not in mapping:
                params.append(param)
                continue
            new, ops = mapping[id(param)]
            state = optimizer.state.pop(param, None)
            if state:
                sliced = _slice_state(state, param.shape, ops)
                if sliced is not None:
                    optimizer.state[new] = sliced
            params.append(new)
        group["params"] = params
