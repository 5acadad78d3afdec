"""Find the repeated block stack of any model: the one answer every layer-wise method needs.

``find_layers(model)`` returns a :class:`LayerStack`: the blocks ("layers") in depth order with their dotted
names, the parameters that sit outside them (embeddings, final norm, head), and, inside each block, the
parameter units by role (attention q/k/v/o, MLP up/gate/down, norms) that Half Fine-Tuning selects from.

Resolution order:

1. an explicit dotted path given by the user (``layers="model.layers"``; a unique suffix of a module name works
   too, so the same string fits a bare model, a LightningModule holding it, or a peft wrapper around it);
2. known layouts: a container named ``blocks``, ``layers``, ``layer``, ``h``, ``block`` or ``stages`` whose
   children are all of one class (timm ViT/DeiT ``blocks``; HF Llama-style ``model.layers``; BERT
   ``encoder.layer``; ViT/AST ``layers`` in transformers 5, ``encoder.layer`` in 4.x; GPT-2 ``transformer.h``),
   or a list of stages that each hold ``blocks`` (timm Swin ``layers``, ConvNeXt ``stages``), flattened in
   depth order; peft-wrapped versions of all of these;
3. the longest ``ModuleList`` / ``Sequential`` of same-class children that hold parameters.

Among several matches of one rule, the stack holding the most parameters wins.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

__all__ = ["BlockUnit", "LayerStack", "find_layers", "ROLE_CATEGORIES"]

_KNOWN_CONTAINER_NAMES = ("blocks", "layers", "layer", "h", "block", "stages")

# Module names (last dotted component, lower case) by role.
_FUSED_QKV = {"qkv", "c_attn", "query_key_value", "wqkv", "qkv_proj", "in_proj"}
_Q = {"q_proj", "query", "q", "q_lin", "wq"}
_K = {"k_proj", "key", "k", "k_lin", "wk"}
_V = {"v_proj", "value", "v", "v_lin", "wv"}
_O = {"o_proj", "out_proj", "proj", "c_proj", "dense", "out_lin", "wo", "o"}
_UP = {"fc1", "up_proj", "c_fc", "lin1", "dense_h_to_4h", "fc_in"}
_GATE = {"gate_proj"}
_DOWN = {"fc2", "down_proj", "c_proj", "lin2", "dense_4h_to_h", "fc_out"}
_ATTENTION_CONTEXT = {"attn", "attention", "self_attn", "self_attention", "attn_layer", "selfattention"}
_MLP_CONTEXT = {"mlp", "ffn", "feed_forward", "feedforward", "intermediate"}
# Name components that peft inserts between a wrapped module and its parameters.
_PEFT_COMPONENTS = {"base_layer", "lora_a", "lora_b", "lora_embedding_a", "lora_embedding_b", "lora_magnitude_vector"}
_PEFT_WRAPPERS = {"modules_to_save", "original_module"}

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


class LayerStack:
    """The repeated blocks of a model and the parameters outside them.

    Build it with :func:`find_layers`. Parameter names are those of ``root.named_parameters()``.

    Example::

        >>> import timm
        >>> from lightning_peft.layers import find_layers
        >>> stack = find_layers(timm.create_model("vit_tiny_patch16_224", depth=3))
        >>> len(stack), stack.names[0]
        (3, 'blocks.0')
        >>> "cls_token" in stack.outside_parameter_names()
        True
    """

    def __init__(self, root: nn.Module, path: str, names: list[str], blocks: list[nn.Module]) -> None:
        self.root = root
        self.path = path
        self.names = tuple(names)
        self.blocks = tuple(blocks)
        prefixes = [name + "." for name in self.names]
        self._block_params: list[list[str]] = [[] for _ in self.names]
        self._outside: list[str] = []
        for param_name, _ in root.named_parameters():
            for index, prefix in enumerate(prefixes):
                if param_name.startswith(prefix):
                    self._block_params[index].append(param_name)
                    break
            else:
                self._outside.append(param_name)
        self._index_of = {p: i for i, params in enumerate(self._block_params) for p in params}

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> nn.Module:
        return self.blocks[index]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.blocks)

    def __repr__(self) -> str:
        return f"LayerStack(path={self.path!r}, n_blocks={len(self)}, first={self.names[0]!r})"

    def block_parameter_names(self, index: int) -> list[str]:
        """Names of the parameters of block ``index``."""
        return list(self._block_params[index])

    def outside_parameter_names(self) -> list[str]:
        """Names of the parameters outside every block (embeddings, norms, head, stage downsamplers)."""
        return list(self._outside)

    def block_of(self, parameter_name: str) -> int | None:
        """Index of the block holding ``parameter_name``, or ``None`` if it sits outside the stack."""
        return self._index_of.get(parameter_name)

    def units(self, index: int) -> list[BlockUnit]:
        """The parameter-owning modules of block ``index`` with their roles, in registration order."""
        block = self.blocks[index]
        prefix = self.names[index] + "."
        modules = dict(block.named_modules())
        grouped: dict[str, list[str]] = {}
        for param_name in self._block_params[index]:
            local = param_name[len(prefix) :]
            grouped.setdefault(_unit_path(local), []).append(param_name)
        units = []
        for path, params in grouped.items():
            module = modules.get(path)
            units.append(BlockUnit(name=path, role=_role(path, module), parameters=tuple(params)))
        return units


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
        if lowered in _PEFT_COMPONENTS or lowered in _PEFT_WRAPPERS:
            skip_next = lowered not in ("base_layer", "original_module")
            continue
        kept.append(part)
    return ".".join(kept)


def _role(path: str, module: nn.Module | None) -> str:
    if module is not None and "norm" in type(module).__name__.lower():
        return "norm"
    components = [c.lower() for c in path.split(".") if c]
    if not components:
        return "other"
    last = components[-1]
    context = set(components[:-1])
    if "norm" in last or last.startswith("ln"):
        return "norm"
    if last in _FUSED_QKV:
        return "qkv"
    if last in _Q:
        return "q"
    if last in _K:
        return "k"
    if last in _V:
        return "v"
    in_attention = bool(context & _ATTENTION_CONTEXT)
    if in_attention and last in _O:
        return "o"
    if last in _GATE:
        return "gate"
    if last in _UP or (last == "dense" and "intermediate" in context):
        return "up"
    if last in _DOWN or (last == "dense" and "output" in context and not in_attention):
        return "down"
    if context & _MLP_CONTEXT and last in {"w1", "w3"}:
        return "up"
    return "other"


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential))


def _stage_blocks(name: str, container: nn.Module) -> tuple[list[str], list[nn.Module]] | None:
    """Flatten a list of stages that each hold ``blocks`` (timm Swin / ConvNeXt), or return None."""
    children = list(container.named_children())
    if not children or not all(_is_container(getattr(child, "blocks", None)) for _, child in children):
        return None
    names, blocks = [], []
    prefix = f"{name}." if name else ""
    for child_name, child in children:
        for block_name, block in child.blocks.named_children():
            names.append(f"{prefix}{child_name}.blocks.{block_name}")
            blocks.append(block)
    return (names, blocks) if blocks else None


def _direct_blocks(name: str, container: nn.Module) -> tuple[list[str], list[nn.Module]] | None:
    children = list(container.named_children())
    if len(children) < 2 or len({type(child) for _, child in children}) != 1:
        return None
    if not all(any(True for _ in child.parameters()) for _, child in children):
        return None
    prefix = f"{name}." if name else ""
    return [f"{prefix}{n}" for n, _ in children], [child for _, child in children]


def _stack_from_container(root: nn.Module, name: str, container: nn.Module) -> LayerStack | None:
    found = _stage_blocks(name, container) or _direct_blocks(name, container)
    if found is None:
        return None
    return LayerStack(root, name, *found)


def _count(blocks: tuple[nn.Module, ...]) -> int:
    return sum(p.numel() for block in blocks for p in block.parameters())


def find_layers(model: nn.Module, layers: str | None = None) -> LayerStack:
    """Find the repeated blocks of ``model``.

    Args:
        model: any ``nn.Module`` — a timm / HF model, a peft wrapper, or a LightningModule holding one.
        layers: dotted path of the block container, overriding the automatic search (``"model.layers"``).
            A unique suffix of a module name is accepted (``"encoder.layer"`` finds
            ``"model.bert.encoder.layer"``).

    Returns:
        The :class:`LayerStack` of ``model``.

    Raises:
        ValueError: if ``layers`` names no container of blocks, or if nothing in the model looks like one.
            The message lists the candidate container paths seen.

    Example::

        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                             intermediate_size=64))
        >>> find_layers(bert).names
        ('encoder.layer.0', 'encoder.layer.1')
        >>> [u.role for u in find_layers(bert).units(0)][:4]
        ['q', 'k', 'v', 'o']
    """
    modules = dict(model.named_modules())
    containers = [name for name, module in modules.items() if _is_container(module) and len(module) > 0]
    if layers is not None:
        return _explicit(model, modules, containers, layers)

    known, fallback = [], []
    for name in containers:
        stack = _stack_from_container(model, name, modules[name])
        if stack is None:
            continue
        last = name.rsplit(".", 1)[-1].lower()
        (known if last in _KNOWN_CONTAINER_NAMES else fallback).append(stack)
    for group, key in ((known, lambda s: (_count(s.blocks), len(s))), (fallback, lambda s: (len(s), _count(s.blocks)))):
        group = _drop_nested(group)
        if group:
            return max(group, key=key)
    raise ValueError(
        f"Could not find the repeated blocks of {type(model).__name__}: no ModuleList/Sequential of same-class"
        f" children with parameters. Candidate container paths seen: {containers or 'none'}."
        ' HINT: pass `layers=` with the dotted path of the block container, e.g. `layers="model.layers"`.'
    )


def _drop_nested(stacks: list[LayerStack]) -> list[LayerStack]:
    """Drop stacks that live inside the blocks or stages of another stack (e.g. a Swin stage's own ``blocks``)."""
    kept = []
    for stack in stacks:
        inside_other = any(
            other is not stack and other.path and stack.path.startswith(other.path + ".") for other in stacks
        )
        if not inside_other:
            kept.append(stack)
    return kept


def _explicit(model: nn.Module, modules: dict[str, nn.Module], containers: list[str], layers: str) -> LayerStack:
    if layers in modules:
        name = layers
    else:
        matches = [n for n in modules if n.endswith("." + layers)]
        if len(matches) != 1:
            found = f"it matches {matches}" if matches else "no module has that name"
            raise ValueError(
                f"`layers={layers!r}` must name one block container of {type(model).__name__}, but {found}."
                f" Candidate container paths: {containers}. HINT: pass one of the candidate paths."
            )
        name = matches[0]
    stack = _stack_from_container(model, name, modules[name]) if _is_container(modules[name]) else None
    if stack is None:
        raise ValueError(
            f"`layers={layers!r}` resolves to {name!r} ({type(modules[name]).__name__}), which is not a"
            " ModuleList/Sequential of same-class blocks with parameters (or of stages holding `blocks`)."
            f" Candidate container paths: {containers}. HINT: pass one of the candidate paths."
        )
    return stack
