"""What is inside a block: the one registry of attention and MLP anatomy every method reads.

Per block it answers where the attention is (separate q/k/v/o projections, or a fused ``[q | k | v]`` projection;
heads, head size, key/value groups; per-head extras such as relative-position bias tables and separate q/k/v bias
vectors) and where the MLP is (up, gate, down; a fused ``gate_up`` projection; ``Conv1D`` layers of GPT-2). Half
Fine-Tuning takes the roles of a block's parameters from here, early pruning takes its sites, the adapters their
insertion points: no family knowledge lives anywhere else.

The built-in recognition reads the module attribute names the common families use (timm, transformers, torch):

==========================  =============================================  ========================================
layout                      attention                                      MLP
==========================  =============================================  ========================================
timm ViT / DeiT / BEiT /    fused ``qkv`` -> ``proj`` (``q_bias`` /        ``fc1`` -> ``fc2``; ``fc1_g``, ``fc1_x``
EVA / Swin, timm AST        ``v_bias``, relative-position tables)          (SwiGLU); ``fc1`` chunked (GluMlp)
transformers decoders,      ``q_proj``, ``k_proj``, ``v_proj`` ->          ``gate_proj``, ``up_proj`` ->
ViT / AST / Swin (v5),      ``o_proj`` / ``out_proj`` (grouped-query       ``down_proj``; ``gate_up_proj`` (fused);
BART / Whisper / CLIP       attention; cross-attention)                    ``fc1`` -> ``fc2``
BERT-style encoders         ``query``, ``key``, ``value`` ->               ``intermediate.dense`` -> ``output.dense``
                            ``output.dense``
GPT-2 (``Conv1D``)          fused ``c_attn`` -> ``c_proj``                 ``c_fc`` -> ``c_proj``
fused decoders (Phi-3)      fused ``qkv_proj`` -> ``o_proj``               ``gate_up_proj`` -> ``down_proj``
T5                          ``q``, ``k``, ``v`` -> ``o`` (heads not        ``wi`` / ``wi_0``, ``wi_1`` -> ``wo``
                            prunable: one position bias for all layers)
==========================  =============================================  ========================================

Your own block: declare its layout once with :func:`register_layout` and every method uses it.

One file on purpose (over 600 lines): it is the layout table of every attention and MLP the package knows,
read top to bottom like a timm model file; splitting it by family would scatter one registry.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from lightning_peft.layout.peft_layers import PEFT_COMPONENTS, PEFT_WRAPPERS, base_layer_of

__all__ = [
    "ROLE_CATEGORIES",
    "AttentionSite",
    "AttentionSpec",
    "BlockAnatomy",
    "BlockUnit",
    "MlpSite",
    "MlpSpec",
    "block_anatomy",
    "block_units",
    "in_features",
    "is_projection",
    "out_features",
    "register_layout",
]

ROLE_CATEGORIES = {
    "q": "attention",
    "k": "attention",
    "v": "attention",
    "o": "attention",
    "qkv": "attention",
    "up": "mlp",
    "gate": "mlp",
    "down": "mlp",
    "norm": "norm",
    "other": "other",
}

# Attribute names by role, as the families of the table above spell them.
_FUSED_QKV = ("qkv", "c_attn", "qkv_proj")
_INTERLEAVED_QKV = ("query_key_value", "wqkv", "Wqkv")  # per-head interleaved q/k/v: not sliceable as chunks
_Q = ("q_proj", "query", "q", "q_lin")
_K = ("k_proj", "key", "k", "k_lin")
_V = ("v_proj", "value", "v", "v_lin")
_O = ("o_proj", "out_proj", "proj", "c_proj", "o", "out_lin")
_GATED = (("gate_proj", "up_proj", "down_proj"), ("fc1_g", "fc1_x", "fc2"), ("wi_0", "wi_1", "wo"), ("w1", "w3", "w2"))
_FUSED_GATE_UP = (("gate_up_proj", "down_proj"),)
_PLAIN = (
    ("fc1", "fc2"),
    ("c_fc", "c_proj"),
    ("wi", "wo"),
    ("intermediate_dense", "output_dense"),
    ("lin1", "lin2"),
    ("fc_in", "fc_out"),
    ("dense_h_to_4h", "dense_4h_to_h"),
    ("linear1", "linear2"),  # nn.TransformerEncoderLayer / DecoderLayer
)
_HEADS_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "key_value_proj_dim")
_ATTENTION_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "intermediate", "experts", "moe", "densereludense")

# Fallback role names for parameters outside every recognised site (norms, unknown layouts).
_NAME_ROLES = {
    **{n: "qkv" for n in (*_FUSED_QKV, *[s.lower() for s in _INTERLEAVED_QKV], "in_proj")},
    **{n: "q" for n in (*_Q, "wq")},
    **{n: "k" for n in (*_K, "wk")},
    **{n: "v" for n in (*_V, "wv")},
}
_NAME_UP = {"fc1", "up_proj", "c_fc", "lin1", "dense_h_to_4h", "fc_in", "wi", "wi_1", "w1", "w3"}
_NAME_DOWN = {"fc2", "down_proj", "c_proj", "lin2", "dense_4h_to_h", "fc_out", "wo", "w2"}
_NAME_O = {"o_proj", "out_proj", "proj", "c_proj", "dense", "out_lin", "wo", "o"}


# ------------------------------------------------------------------------------------------------ projections


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 family): a Linear with its weight stored transposed, (in, out)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_projection(module: nn.Module | None) -> bool:
    """Whether ``module`` is a Linear or transformers ``Conv1D``, possibly wrapped by HF peft."""
    if module is None:
        return False
    base = base_layer_of(module)
    return isinstance(base, nn.Linear) or _is_conv1d(base)


def in_features(module: nn.Module) -> int:
    """Input width of a projection (Linear or ``Conv1D``, peft-wrapped or not)."""
    base = base_layer_of(module)
    return int(base.weight.shape[0]) if _is_conv1d(base) else int(base.in_features)


def out_features(module: nn.Module) -> int:
    """Output width of a projection (Linear or ``Conv1D``, peft-wrapped or not)."""
    base = base_layer_of(module)
    return int(base.nf) if _is_conv1d(base) else int(base.out_features)


# ------------------------------------------------------------------------------------------------ sites


@dataclass
class AttentionSite:
    """An attention module whose heads can be pruned (or that cannot, and why).

    Attributes:
        path: dotted name of the attention module under the root searched.
        block: index of the block in the :class:`~lightning_peft.layout.LayerStack`.
        module: the module holding the head counts (``num_heads`` and the like).
        o: the projection receiving the concatenated head outputs.
        num_heads: number of query heads.
        num_kv_heads: number of key/value heads (``num_heads`` without grouped-query attention).
        head_dim: features per head.
        q, k, v: separate projections, or ``None`` with a fused ``qkv``.
        qkv: a fused ``[q | k | v]`` projection, or ``None``.
        cross: cross-attention (keys and values from another sequence).
        extras: ``(owner, attribute, dim, kind)`` of further tensors sliced with the heads: ``kind`` is ``"heads"``
            (one entry per query head along ``dim``, e.g. a relative-position bias table), ``"q"`` or ``"kv"`` (one
            entry per query / key-value feature, e.g. BEiT's ``q_bias``).
        problem: ``None``, or why the heads of this site cannot be pruned.
    """

    path: str
    block: int
    module: nn.Module
    o: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q: nn.Module | None = None
    k: nn.Module | None = None
    v: nn.Module | None = None
    qkv: nn.Module | None = None
    cross: bool = False
    extras: list[tuple[nn.Module, str, int, str]] = field(default_factory=list)
    problem: str | None = None

    @property
    def kind(self) -> str:
        """``"fused"`` (one ``[q | k | v]`` projection) or ``"separate"``."""
        return "fused" if self.qkv is not None else "separate"

    @property
    def out_proj(self) -> nn.Module:
        """The output projection (alias of :attr:`o`)."""
        return self.o

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
        up: the projections producing the hidden features (output-sliced).
        gate: gate projections of a gated MLP (output-sliced like ``up``).
        down: the projection consuming them (input-sliced).
        fused: a projection whose output holds ``[gate | up]`` halves (``gate_up_proj``, timm ``GluMlp.fc1``).
        owner: the module whose ``intermediate_size`` / ``hidden_features`` attribute is kept in step, if any.
    """

    path: str
    block: int
    up: list[nn.Module]
    down: nn.Module
    gate: list[nn.Module] = field(default_factory=list)
    fused: nn.Module | None = None
    owner: nn.Module | None = None

    @property
    def in_projs(self) -> list[nn.Module]:
        """Every projection whose outputs are the hidden neurons (gate, up; the fused one included)."""
        return [*self.gate, *self.up, *([self.fused] if self.fused is not None else [])]

    @property
    def out_proj(self) -> nn.Module:
        """The down projection (alias of :attr:`down`)."""
        return self.down

    @property
    def hidden(self) -> int:
        """Current number of hidden neurons."""
        return in_features(self.down)


@dataclass
class BlockAnatomy:
    """The recognised sites of one block, and what was seen but not recognised (with the reason)."""

    attention: list[AttentionSite] = field(default_factory=list)
    mlp: list[MlpSite] = field(default_factory=list)
    unrecognised: list[tuple[str, str]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ declared layouts


@dataclass(frozen=True)
class AttentionSpec:
    """Where an attention sits in a block of your own model (paths relative to the block).

    Args:
        module: path of the attention module (holding the head-count attributes, if any; ``""`` for the block).
        o: path of the output projection.
        q, k, v: paths of separate projections, or ``qkv`` for a fused ``[q | k | v]`` one.
        qkv: path of a fused projection whose output is ``[q | k | v]`` in that order.
        num_heads: number of heads (default: read ``num_heads`` / ``num_attention_heads`` / ``n_heads``).
        head_dim: features per head (default: read ``head_dim`` or derive it).
        cross: cross-attention.
    """

    module: str
    o: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    cross: bool = False


@dataclass(frozen=True)
class MlpSpec:
    """Where an MLP sits in a block of your own model (paths relative to the block).

    Args:
        down: path of the projection consuming the hidden neurons.
        up: paths of the projections producing them.
        gate: paths of gate projections (gated MLPs).
        fused: path of one projection producing ``[gate | up]`` halves.
        module: path of the module owning ``hidden_features`` / ``intermediate_size`` (optional).
    """

    down: str
    up: Sequence[str] = ()
    gate: Sequence[str] = ()
    fused: str | None = None
    module: str | None = None


_DECLARED: dict[type, tuple[tuple[AttentionSpec, ...], tuple[MlpSpec, ...]]] = {}


def register_layout(
    block_type: type[nn.Module], attention: Sequence[AttentionSpec] = (), mlp: Sequence[MlpSpec] = ()
) -> None:
    """Declare the anatomy of your own block class, once, for every method (Half Fine-Tuning, pruning, adapters).

    A declared block class is read from its declaration only (the built-in recognition is skipped for it).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> class MyBlock(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.wq, self.wk, self.wv, self.wo = (nn.Linear(8, 8) for _ in range(4))
        ...         self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        >>> register_layout(MyBlock, attention=[AttentionSpec("", q="wq", k="wk", v="wv", o="wo", num_heads=2)],
        ...                 mlp=[MlpSpec(up=["up"], down="down")])
        >>> anatomy = block_anatomy(MyBlock())
        >>> anatomy.attention[0].num_heads, anatomy.attention[0].head_dim, anatomy.mlp[0].hidden
        (2, 4, 16)
    """
    if not isinstance(block_type, type) or not issubclass(block_type, nn.Module):
        raise ValueError(
            f"`block_type` must be an nn.Module subclass, got {block_type!r}. HINT: pass the class of your block."
        )
    _DECLARED[block_type] = (tuple(attention), tuple(mlp))


# ------------------------------------------------------------------------------------------- recognition


def _attr_int(module: nn.Module, names: Sequence[str]) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _first_projection(module: nn.Module, names: Sequence[str]) -> tuple[str, nn.Module] | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module) and is_projection(child):
            return name, child
    return None


def _norm_like(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _heads(module: nn.Module, q_width: int, num_heads: int | None, head_dim: int | None) -> tuple[int, int] | None:
    heads = num_heads or _attr_int(module, _HEADS_ATTRS)
    dim = head_dim or _attr_int(module, _HEAD_DIM_ATTRS)
    if heads and not dim and q_width % heads == 0:
        dim = q_width // heads
    if dim and not heads and q_width % dim == 0:
        heads = q_width // dim
    if not heads or not dim or heads * dim != q_width:
        return None
    return heads, dim


def _make_attention(
    path: str,
    block: int,
    module: nn.Module,
    o: nn.Module,
    q: nn.Module | None = None,
    k: nn.Module | None = None,
    v: nn.Module | None = None,
    qkv: nn.Module | None = None,
    num_heads: int | None = None,
    head_dim: int | None = None,
    cross: bool = False,
) -> AttentionSite | str:
    """Build a site, or return why the module cannot be read as an attention."""
    q_width = in_features(o)
    found = _heads(module, q_width, num_heads, head_dim)
    if found is None:
        return f"cannot tell its head count and head size (output projection takes {q_width} features)"
    heads, dim = found
    if qkv is not None:
        total = out_features(qkv)
        if (total - q_width) % (2 * dim):
            return f"its fused projection has {total} outputs, not [q | k | v] of {heads} x {dim}-feature heads"
        kv_heads = (total - q_width) // (2 * dim)
    else:
        assert q is not None and k is not None and v is not None
        if out_features(q) != q_width or out_features(k) != out_features(v) or out_features(k) % dim:
            return "its q / k / v / output projections do not agree on the head layout"
        kv_heads = out_features(k) // dim
    if kv_heads < 1 or heads % kv_heads:
        return f"{heads} query heads do not divide into {kv_heads} key/value heads"
    site = AttentionSite(path, block, module, o, heads, kv_heads, dim, q=q, k=k, v=v, qkv=qkv, cross=cross)
    site.problem = _attention_extras(site)
    return site


# A forward that derives the heads' layout from the width of its input cannot run with fewer heads: it reshapes the
# heads' output back to that width (timm BEiT / EVA: ``reshape(B, N, C)``) or splits it into ``C // num_heads``.
_INPUT_WIDTH_RESHAPE = re.compile(r"\.(reshape|view)\(\s*B\s*,\s*N\s*,\s*C\s*\)|\bC\s*//\s*self\.num_heads\b")


@functools.cache
def _reshapes_to_input_width(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return bool(_INPUT_WIDTH_RESHAPE.search(source))


def _attention_extras(site: AttentionSite) -> str | None:
    """Find the tensors besides the projections that scale with the heads; return a problem, if any."""
    module = site.module
    if isinstance(module, nn.MultiheadAttention):
        return "nn.MultiheadAttention derives its head size from `embed_dim`, which must stay the model width"
    if _reshapes_to_input_width(type(module)):
        return (
            f"{type(module).__name__}.forward derives the heads' layout from the width of its input"
            " (`reshape(B, N, C)` or `C // num_heads`), which fails once heads are removed"
        )
    if getattr(module, "has_relative_attention_bias", None) is not None:
        return (
            "T5-style attention: the first layer's position bias (one value per head) is reused by every later"
            " layer, so layers cannot lose different heads"
        )
    # projections are not extras: the site's own are sliced, others (a gate, or the MLP of a block declared as its
    # own attention module) are checked by pruning a copy of the block (lightning_peft.pruning.verify)
    skip: set[int] = set()
    for child in module.modules():
        if is_projection(child):
            skip.update(id(m) for m in child.modules())
    q_width = site.num_heads * site.head_dim
    kv_width = site.num_kv_heads * site.head_dim
    for owner in module.modules():
        if id(owner) in skip:
            continue
        tensors = [(n, t, True) for n, t in owner.named_parameters(recurse=False)]
        tensors += [(n, t, False) for n, t in owner.named_buffers(recurse=False)]
        for name, tensor, is_param in tensors:
            if tensor is None:
                continue
            shape = tuple(tensor.shape)
            if is_param and _norm_like(owner):
                return (
                    f"a norm over all heads' features ({type(owner).__name__}) sits inside it and would change when"
                    " heads go"
                )
            if len(shape) == 1 and shape[0] in (q_width, kv_width):
                site.extras.append((owner, name, 0, "q" if shape[0] == q_width else "kv"))
                continue
            head_dims = [d for d, size in enumerate(shape) if size == site.num_heads]
            if len(head_dims) == 1 and tensor.is_floating_point():
                site.extras.append((owner, name, head_dims[0], "heads"))
                continue
            if is_param:
                return (
                    f"its parameter {name!r} of shape {list(shape)} has no dimension of {site.num_heads} heads or"
                    f" {q_width} features to slice"
                )
    return None


def _recognise_attention(
    path: str, block: int, module: nn.Module, parent: nn.Module | None
) -> AttentionSite | str | None:
    cross = any(w in path.lower() for w in ("cross", "encoder_attn", "encdec"))
    interleaved = _first_projection(module, _INTERLEAVED_QKV)
    fused = _first_projection(module, _FUSED_QKV)
    o = _first_projection(module, _O)
    if interleaved is not None and (o is not None or _first_projection(module, ("dense",)) is not None):
        return f"its fused projection {interleaved[0]!r} interleaves q / k / v per head"
    if fused is not None and o is not None and fused[0] != o[0]:
        if getattr(module, "is_cross_attention", False):
            return "GPT-2 style cross-attention (separate q_attn) is not supported"
        return _make_attention(path, block, module, o[1], qkv=fused[1], cross=cross)
    q, k, v = (_first_projection(module, names) for names in (_Q, _K, _V))
    if q is None or k is None or v is None:
        return None
    if o is None:  # BERT-style: the output projection lives beside the self-attention module
        dense = getattr(getattr(parent, "output", None), "dense", None)
        if not is_projection(dense):
            return None
        o = ("output.dense", dense)
    return _make_attention(path, block, module, o[1], q=q[1], k=k[1], v=v[1], cross=cross)


def _mlp_norm_problem(module: nn.Module) -> str | None:
    norm = getattr(module, "norm", None)
    if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
        return f"a norm over the hidden neurons ({type(norm).__name__}) would change when neurons go"
    return None


def _mlp_between_problem(module: nn.Module, projections: Sequence[nn.Module], local: bool) -> str | None:
    """Why a layer with parameters between an MLP's projections (PVT's depthwise conv) stops the pruning, if one does.

    ``local`` is False for MLPs whose projections sit directly in the block (BART), where other layers are no
    obstacle.
    """
    if not local:
        return None
    inside = {id(m) for p in projections for m in p.modules()}
    for name, child in module.named_modules():
        if not name or id(child) in inside or _is_peft_part(name):
            continue
        if any(True for _ in child.parameters(recurse=False)):
            return f"its {type(child).__name__} {name!r} sits between the projections and would need slicing too"
    return None


def _recognise_mlp(path: str, block: int, module: nn.Module, local: bool = True) -> MlpSite | str | None:
    for gate_name, up_name, down_name in _GATED:
        found = [_first_projection(module, (n,)) for n in (gate_name, up_name, down_name)]
        if all(found):
            gate, up, down = (f[1] for f in found)  # type: ignore[index]
            problem = _mlp_norm_problem(module) or _mlp_between_problem(module, [gate, up, down], local)
            return problem or MlpSite(path, block, [up], down, gate=[gate], owner=module)
    for fused_name, down_name in _FUSED_GATE_UP:
        fused, down = _first_projection(module, (fused_name,)), _first_projection(module, (down_name,))
        if fused and down and out_features(fused[1]) == 2 * in_features(down[1]):
            problem = _mlp_norm_problem(module) or _mlp_between_problem(module, [fused[1], down[1]], local)
            return problem or MlpSite(path, block, [], down[1], fused=fused[1], owner=module)
    for up_name, down_name in _PLAIN:
        up, down = _first_projection(module, (up_name,)), _first_projection(module, (down_name,))
        if up and down and up[0] != down[0]:
            problem = _mlp_norm_problem(module) or _mlp_between_problem(module, [up[1], down[1]], local)
            if problem:
                return problem
            if out_features(up[1]) == 2 * in_features(down[1]):  # timm GluMlp: fc1 holds both halves
                return MlpSite(path, block, [], down[1], fused=up[1], owner=module)
            if out_features(up[1]) != in_features(down[1]):
                return None
            return MlpSite(path, block, [up[1]], down[1], owner=module)
    intermediate, output = getattr(module, "intermediate", None), getattr(module, "output", None)
    dense_in, dense_out = getattr(intermediate, "dense", None), getattr(output, "dense", None)
    if is_projection(dense_in) and is_projection(dense_out) and out_features(dense_in) == in_features(dense_out):
        return MlpSite(path, block, [dense_in], dense_out, owner=None)
    return None


def _resolve(block: nn.Module, path: str | None) -> nn.Module | None:
    if path is None:
        return None
    return block.get_submodule(path) if path else block


def _declared(block: nn.Module, name: str, index: int) -> BlockAnatomy | None:
    for cls in type(block).__mro__:
        if cls in _DECLARED:
            attention_specs, mlp_specs = _DECLARED[cls]
            break
    else:
        return None
    anatomy = BlockAnatomy()
    for spec in attention_specs:
        module = _resolve(block, spec.module)
        site = _make_attention(
            _join(name, spec.module),
            index,
            module,
            _resolve(block, spec.o),
            q=_resolve(block, spec.q),
            k=_resolve(block, spec.k),
            v=_resolve(block, spec.v),
            qkv=_resolve(block, spec.qkv),
            num_heads=spec.num_heads,
            head_dim=spec.head_dim,
            cross=spec.cross,
        )
        if isinstance(site, str):
            anatomy.unrecognised.append((_join(name, spec.module), f"declared attention: {site}"))
        else:
            anatomy.attention.append(site)
    for spec in mlp_specs:
        anatomy.mlp.append(
            MlpSite(
                _join(name, spec.module if spec.module is not None else spec.down),
                index,
                [block.get_submodule(p) for p in spec.up],
                block.get_submodule(spec.down),
                gate=[block.get_submodule(p) for p in spec.gate],
                fused=_resolve(block, spec.fused),
                owner=_resolve(block, spec.module),
            )
        )
    return anatomy


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def block_anatomy(block: nn.Module, name: str = "", index: int = 0) -> BlockAnatomy:
    """The attention and MLP sites of ``block`` (paths prefixed with ``name``), and what was not recognised.

    Example::

        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", depth=1, embed_dim=32, num_heads=4)
        >>> anatomy = block_anatomy(vit.blocks[0], "blocks.0")
        >>> [(s.path, s.kind, s.num_heads, s.head_dim) for s in anatomy.attention], anatomy.mlp[0].hidden
        ([('blocks.0.attn', 'fused', 4, 8)], 128)
    """
    declared = _declared(block, name, index)
    if declared is not None:
        return declared
    anatomy = BlockAnatomy()
    parents = {id(child): parent for parent in block.modules() for child in parent.children()}
    covered: set[int] = set()
    for local, module in block.named_modules():
        if id(module) in covered or is_projection(module) or _is_peft_part(local):
            continue
        path = _join(name, local)
        attention = _recognise_attention(path, index, module, parents.get(id(module)))
        if isinstance(attention, AttentionSite):
            anatomy.attention.append(attention)
            covered.update(id(p) for p in (attention.q, attention.k, attention.v, attention.qkv, attention.o) if p)
            continue
        if isinstance(attention, str):
            anatomy.unrecognised.append((path, f"attention: {attention}"))
            covered.update(id(m) for m in module.modules())
            continue
        mlp = _recognise_mlp(path, index, module, local=bool(local))
        if isinstance(mlp, MlpSite):
            if id(mlp.down) not in covered:
                anatomy.mlp.append(mlp)
                covered.update(id(p) for p in (*mlp.in_projs, mlp.down))
            continue
        if isinstance(mlp, str):
            anatomy.unrecognised.append((path, f"MLP: {mlp}"))
    _report_unseen(block, name, anatomy, covered)
    return anatomy


def _is_peft_part(local: str) -> bool:
    return any(part.lower() in PEFT_COMPONENTS or part in PEFT_WRAPPERS for part in local.split("."))


def _report_unseen(block: nn.Module, name: str, anatomy: BlockAnatomy, covered: set[int]) -> None:
    """Name attention / MLP modules holding parameters that no recognised site covers."""
    seen = {path for path, _ in anatomy.unrecognised}
    sites = [s.path for s in (*anatomy.attention, *anatomy.mlp)]
    for local, module in block.named_modules():
        if not local or _is_peft_part(local):
            continue
        last = local.rsplit(".", 1)[-1].lower()
        path = _join(name, local)
        words = [w for w in (*_ATTENTION_WORDS, *_MLP_WORDS) if w in last]
        if not words or any(path == s or path.startswith(s + ".") or s.startswith(path + ".") for s in sites):
            continue
        if any(path == p or path.startswith(p + ".") for p in seen):
            continue
        projections = [m for m in module.modules() if is_projection(m) and id(m) not in covered]
        if projections or any(p.dim() >= 2 for p in module.parameters(recurse=False)):
            kind = "attention" if any(w in last for w in _ATTENTION_WORDS) else "MLP"
            anatomy.unrecognised.append((path, f"{kind}: layout of {type(module).__name__} not recognised"))
            seen.add(path)


# ----------------------------------------------------------------------------------------------- roles


@dataclass(frozen=True)
class BlockUnit:
    """A parameter-owning module inside a block, with the role it plays.

    Attributes:
        name: dotted path of the module relative to the block (``"self_attn.q_proj"``); peft's inner names
            (``base_layer``, ``lora_A.default``) are folded into the module they wrap.
        role: one of ``q``, ``k``, ``v``, ``o``, ``qkv`` (fused), ``up``, ``gate``, ``down``, ``norm``, ``other``.
        parameters: names of the unit's parameters, relative to the root the stack was found in.
    """

    name: str
    role: str
    parameters: tuple[str, ...]

    @property
    def category(self) -> str:
        """``attention``, ``mlp``, ``norm`` or ``other``."""
        return ROLE_CATEGORIES[self.role]


def _unit_path(local_param_name: str) -> str:
    """Module path owning a parameter, with peft's inner components folded away."""
    parts = local_param_name.split(".")[:-1]
    leaf = local_param_name.split(".")[-1]
    if leaf in ("in_proj_weight", "in_proj_bias"):  # nn.MultiheadAttention's fused q/k/v projection
        parts = [*parts, "in_proj"]
    kept: list[str] = []
    skip_next = False
    for part in parts:
        if skip_next:  # the adapter name after lora_A / modules_to_save ("default")
            skip_next = False
            continue
        lowered = part.lower()
        if lowered in PEFT_COMPONENTS or lowered in PEFT_WRAPPERS:
            skip_next = lowered not in ("base_layer", "original_module")
            continue
        kept.append(part)
    return ".".join(kept)


def _anatomy_roles(block: nn.Module) -> dict[int, str]:
    roles: dict[int, str] = {}
    anatomy = block_anatomy(block)
    for site in anatomy.attention:
        for role in ("q", "k", "v", "qkv", "o"):
            module = getattr(site, role)
            if module is not None:
                roles[id(module)] = role
    for mlp in anatomy.mlp:
        roles.update({id(m): "gate" for m in mlp.gate})
        roles.update({id(m): "up" for m in mlp.up})
        if mlp.fused is not None:
            roles[id(mlp.fused)] = "up"
        roles[id(mlp.down)] = "down"
    return roles


def _name_role(path: str, module: nn.Module | None) -> str:
    """Role by name, for parameters outside every recognised site."""
    if module is not None and _norm_like(module):
        return "norm"
    components = [c.lower() for c in path.split(".") if c]
    if not components:
        return "other"
    last, context = components[-1], set(components[:-1])
    if "norm" in last or last.startswith("ln"):
        return "norm"
    if last in _NAME_ROLES:
        return _NAME_ROLES[last]
    in_attention = any(w in c for c in context for w in _ATTENTION_WORDS)
    if in_attention and last in _NAME_O:
        return "o"
    if last == "gate_proj":
        return "gate"
    if last in _NAME_UP or (last == "dense" and "intermediate" in context):
        return "up"
    if last in _NAME_DOWN or (last == "dense" and "output" in context and not in_attention):
        return "down"
    return "other"


def block_units(block: nn.Module, parameters: Sequence[tuple[str, str]]) -> list[BlockUnit]:
    """Group a block's parameters by owning module and give each group its role.

    Args:
        block: the block module.
        parameters: ``(name under the root, name relative to the block)`` of each of the block's parameters.
    """
    modules = dict(block.named_modules())
    roles = _anatomy_roles(block)
    grouped: dict[str, list[str]] = {}
    for full, local in parameters:
        grouped.setdefault(_unit_path(local), []).append(full)
    units = []
    for path, params in grouped.items():
        module = modules.get(path)
        role = roles.get(id(module)) if module is not None else None
        units.append(BlockUnit(name=path, role=role or _name_role(path, module), parameters=tuple(params)))
    return units
