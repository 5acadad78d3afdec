"""Find every repeated block stack of a model: the one answer every layer-wise method needs.

``find_blocks(model)`` returns a :class:`LayerStack`: all the blocks ("layers") of the model in forward order with
their dotted names, each knowing the stack it belongs to (``encoder.block`` and ``decoder.block`` of T5;
``layer1`` ... ``layer4`` of a ResNet; the text and vision towers of CLIP), the parameters that sit outside every
block (stem / embeddings, norms, head, downsamplers between stages), and, inside each block, the parameter units by
role (attention q/k/v/o, MLP up/gate/down, norms) that Half Fine-Tuning selects from.

Resolution, first match wins:

1. the paths the user gives (``layers="model.layers"`` or a list of paths; a unique suffix of a module name works
   too, so the same string fits a bare model, a LightningModule holding it, or a peft wrapper around it);
2. what the model declares: timm's ``group_matcher()`` (every timm model names its block groups; a user's own
   model may define one too), transformers' ``_no_split_modules`` (the block classes of each architecture), the
   ``layers`` of ``nn.TransformerEncoder`` / ``nn.TransformerDecoder``;
3. name heuristics: containers named ``blocks``, ``layers``, ``layer``, ``h``, ``block`` or ``stages`` whose
   children are all of one class, or lists of stages that each hold ``blocks`` (flattened);
4. the longest ``ModuleList`` / ``Sequential`` of same-class children that hold parameters.

A found block that is a stage (a list of blocks, or a ``*Stage`` class with most of its parameters in a list of
same-class sub-blocks, as in Swin or MaxViT) is replaced by its sub-blocks; a declared layer that is one of a few
inside an undeclared repeated module (HF ResNet's conv layers) is replaced by that module. Models that apply one
block several times (ALBERT) are found with
:attr:`LayerStack.shared` set: methods that sample or prune blocks refuse them with a reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from lightning_peft.layout.anatomy import BlockUnit, block_units

__all__ = ["LayerStack", "Stack", "find_blocks", "resolve_paths"]

_KNOWN_CONTAINER_NAMES = ("blocks", "layers", "layer", "h", "block", "stages")


@dataclass(frozen=True)
class Stack:
    """One stack of blocks: its container path and the range of block indices (``start`` inclusive) it holds."""

    path: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def indices(self) -> range:
        """Indices of this stack's blocks in the :class:`LayerStack`."""
        return range(self.start, self.stop)


class LayerStack:
    """All repeated blocks of a model, in forward order, and the parameters outside them.

    Build it with :func:`find_blocks`. Parameter names are those of ``root.named_parameters()``. Block indices run
    over every stack (``0 .. len(stack) - 1``); :attr:`stacks` says which indices belong to which container.

    Attributes:
        root: the module searched.
        names: dotted name of each block.
        blocks: the block modules.
        stacks: the stacks, in forward order.
        source: which rule found them (``"explicit"``, ``"timm group_matcher"``, ``"transformers _no_split_modules"``,
            ``"nn.Transformer"``, ``"names"``, ``"longest list"``).
        shared: ``None``, or why the blocks are applied more than once per forward (shared weights, as ALBERT).

    Example::

        >>> import timm
        >>> from lightning_peft.layout import find_blocks
        >>> stack = find_blocks(timm.create_model("resnet18"))
        >>> len(stack), [s.path for s in stack.stacks]
        (8, ['layer1', 'layer2', 'layer3', 'layer4'])
        >>> stack.stack_of(2).path, "fc.weight" in stack.outside_parameter_names()
        ('layer2', True)
    """

    def __init__(
        self,
        root: nn.Module,
        names: Sequence[str],
        blocks: Sequence[nn.Module],
        source: str = "",
        shared: str | None = None,
    ) -> None:
        self.root = root
        self.names = tuple(names)
        self.blocks = tuple(blocks)
        self.source = source
        self.shared = shared
        stacks: list[Stack] = []
        for index, name in enumerate(self.names):
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            if stacks and stacks[-1].path == parent and stacks[-1].stop == index:
                stacks[-1] = Stack(parent, stacks[-1].start, index + 1)
            else:
                stacks.append(Stack(parent, index, index + 1))
        self.stacks = tuple(stacks)
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

    @property
    def path(self) -> str:
        """The stacks' container paths, comma-separated (one path for a single-stack model)."""
        return ", ".join(s.path for s in self.stacks)

    @property
    def paths(self) -> list[str]:
        """The stacks' container paths, in forward order."""
        return [s.path for s in self.stacks]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> nn.Module:
        return self.blocks[index]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.blocks)

    def __repr__(self) -> str:
        return f"LayerStack(stacks={self.paths!r}, n_blocks={len(self)}, source={self.source!r})"

    def refuse_shared(self, method: str, hint: str) -> None:
        """Raise a ``ValueError`` naming ``method`` if the blocks are shared (applied more than once per forward).

        Raises:
            ValueError: if :attr:`shared` is set; the message ends with ``hint``.
        """
        if self.shared is not None:
            raise ValueError(f"`{method}` works on distinct blocks, but {self.shared} (at {self.path!r}). HINT: {hint}")

    def stack_of(self, index: int) -> Stack:
        """The :class:`Stack` holding block ``index``."""
        for stack in self.stacks:
            if stack.start <= index < stack.stop:
                return stack
        raise IndexError(f"block index {index} out of range (the model has {len(self)} blocks)")

    def block_parameter_names(self, index: int) -> list[str]:
        """Names of the parameters of block ``index``."""
        return list(self._block_params[index])

    def outside_parameter_names(self) -> list[str]:
        """Names of the parameters outside every block (embeddings, norms, head, stage downsamplers)."""
        return list(self._outside)

    def block_of(self, parameter_name: str) -> int | None:
        """Index of the block holding ``parameter_name``, or ``None`` if it sits outside every stack."""
        return self._index_of.get(parameter_name)

    def units(self, index: int) -> list[BlockUnit]:
        """The parameter-owning modules of block ``index`` with their roles, in registration order."""
        prefix = self.names[index] + "."
        return block_units(self.blocks[index], [(p, p[len(prefix) :]) for p in self._block_params[index]])


# ----------------------------------------------------------------------------------------------------- helpers


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential))


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _children_blocks(name: str, container: nn.Module, min_len: int = 2) -> list[tuple[str, nn.Module]] | None:
    """The children of a container when they are ``min_len`` or more modules of one class holding parameters."""
    children = list(container.named_children())
    if len(children) < min_len or len({type(child) for _, child in children}) != 1:
        return None
    if not all(_has_params(child) for _, child in children):
        return None
    return [(_join(name, n), child) for n, child in children]


def _refine(blocks: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Replace stage-like blocks by their sub-blocks.

    A block is a stage when it is itself a list of blocks, or when its class says so (``SwinStage``,
    ``MaxxVitStage``) and a list of same-class sub-blocks inside it holds most of its parameters. A list of experts
    (mixture-of-experts layers) is never taken for sub-blocks.
    """
    refined: list[tuple[str, nn.Module]] = []
    for name, block in blocks:
        inner = None
        if _is_container(block):
            inner = _children_blocks(name, block, min_len=1)
        elif "stage" in type(block).__name__.lower():
            total = _numel(block)
            for child_name, child in block.named_modules():
                if not child_name or not _is_container(child) or "expert" in child_name.lower():
                    continue
                found = _children_blocks(_join(name, child_name), child, min_len=1)
                if found and 2 * _numel(child) > total:
                    inner = found
                    break
        refined.extend(_refine(inner) if inner else [(name, block)])
    return refined


def _drop_outer(blocks: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Keep the innermost blocks when declared block classes nest (a stage class holding layer classes)."""
    names = [n for n, _ in blocks]
    return [(n, b) for n, b in blocks if not any(o != n and o.startswith(n + ".") for o in names)]


def _in_registration_order(root: nn.Module, blocks: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    order = {name: i for i, (name, _) in enumerate(root.named_modules())}
    unique = {name: module for name, module in blocks}
    return sorted(unique.items(), key=lambda item: order.get(item[0], len(order)))


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


# ----------------------------------------------------------------------------------------- declared stacks


def _timm_blocks(modules: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """Blocks named by the ``group_matcher()`` of every (outermost) module that defines one."""
    found: list[tuple[str, nn.Module]] = []
    covered: list[str] = []
    for prefix, module in modules.items():
        matcher = getattr(type(module), "group_matcher", None)
        if not callable(matcher) or any(_under(prefix, c) for c in covered):
            continue
        try:
            groups = module.group_matcher(coarse=False)
        except Exception:  # a matcher that needs arguments or fails: not a declaration we can read
            continue
        if not isinstance(groups, dict):
            continue  # a callable matcher (some timm models) names no patterns
        patterns: list[re.Pattern] = []
        for key, value in groups.items():
            if key.startswith("stem"):
                continue
            entries = [(value, None)] if isinstance(value, str) else list(value)
            patterns += [re.compile(p) for p, suffix in entries if suffix is None]
        if not patterns:
            continue
        covered.append(prefix)
        local_modules = dict(module.named_modules())
        names: list[str] = []
        for param_name, _ in module.named_parameters():
            for pattern in patterns:
                match = pattern.match(param_name)
                if match and match.end() < len(param_name) and param_name[match.end()] == ".":
                    local = param_name[: match.end()]
                    if local in local_modules and local not in names:
                        names.append(local)
                    break
        found += [(_join(prefix, n), local_modules[n]) for n in names]
    return found


def _transformers_blocks(modules: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """Modules of the classes transformers declares as blocks (``_no_split_modules``) that sit in a module list."""
    declared: set[str] = set()
    for module in modules.values():
        declared.update(getattr(module, "_no_split_modules", None) or ())
    if not declared:
        return []
    parents = {id(child): parent for parent in modules.values() for child in parent.children()}
    names = {id(module): name for name, module in modules.items()}
    found = []
    for name, module in modules.items():
        container = parents.get(id(module))
        if type(module).__name__ not in declared or container is None or not _is_container(container):
            continue
        # a declared layer that is one of a few inside an undeclared, repeated module (HF ResNet's conv layers
        # inside ResNetBasicLayer): the repeated module is the block
        owner = parents.get(id(container))
        outer = parents.get(id(owner)) if owner is not None else None
        if (
            owner is not None
            and type(owner).__name__ not in declared
            and outer is not None
            and _children_blocks(names[id(outer)], outer) is not None
        ):
            name, module = names[id(owner)], owner
        found.append((name, module))
    unique = list({name: module for name, module in found}.items())
    return _drop_outer([(n, m) for n, m in unique if _has_params(m)])


def _torch_transformer_blocks(modules: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, module in modules.items():
        if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
            found += [(_join(name, _join("layers", n)), child) for n, child in module.layers.named_children()]
    return found


def _shared_blocks(root: nn.Module, modules: dict[str, nn.Module]) -> tuple[list[tuple[str, nn.Module]], str] | None:
    """Blocks applied several times per forward, as an HF config declares them (ALBERT's ``num_hidden_groups``)."""
    for module in modules.values():
        config = getattr(module, "config", None)
        groups = getattr(config, "num_hidden_groups", None)
        layers = getattr(config, "num_hidden_layers", None)
        if not isinstance(groups, int) or not isinstance(layers, int) or layers <= groups:
            continue
        for name, container in modules.items():
            if _is_container(container) and len(container) == groups:
                blocks = _children_blocks(name, container, min_len=1)
                if blocks:
                    reason = (
                        f"the model applies its {groups} block group(s) {layers} times per forward"
                        f" ({type(config).__name__}: `num_hidden_groups={groups}`, `num_hidden_layers={layers}`),"
                        " so the blocks' weights are shared"
                    )
                    return blocks, reason
    return None


# ------------------------------------------------------------------------------------------ name heuristics


def _stage_blocks(name: str, container: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """Flatten a list of stages that each hold ``blocks`` (Swin / ConvNeXt-like models), or return None."""
    children = list(container.named_children())
    if not children or not all(_is_container(getattr(child, "blocks", None)) for _, child in children):
        return None
    found = [
        (_join(name, f"{child_name}.blocks.{block_name}"), block)
        for child_name, child in children
        for block_name, block in child.blocks.named_children()
    ]
    return found or None


def _heuristic_blocks(modules: dict[str, nn.Module], containers: list[str]) -> tuple[list, str] | None:
    known, fallback = [], []
    for name in containers:
        found = _stage_blocks(name, modules[name]) or _children_blocks(name, modules[name])
        if found is None:
            continue
        last = name.rsplit(".", 1)[-1].lower()
        (known if last in _KNOWN_CONTAINER_NAMES else fallback).append((name, found))

    def drop_nested(groups):
        return [
            (name, found)
            for name, found in groups
            if not any(other != name and other and name.startswith(other + ".") for other, _ in groups)
        ]

    known = drop_nested(known)
    if known:  # every known-named stack (encoder and decoder, towers) in registration order
        return [block for _, found in known for block in found], "names"
    fallback = drop_nested(fallback)
    if fallback:
        name, found = max(fallback, key=lambda g: (len(g[1]), sum(_numel(b) for _, b in g[1])))
        return found, "longest list"
    return None


# ------------------------------------------------------------------------------------------------ public


def resolve_paths(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """Resolve user-given block container paths (full names or unique suffixes) to module names of ``model``.

    Raises:
        ValueError: if a path names no module or several; the message lists the candidate container paths.
    """
    modules = dict(model.named_modules())
    containers = [name for name, module in modules.items() if _is_container(module) and len(module) > 0]
    paths = [layers] if isinstance(layers, str) else list(layers)
    if not paths or not all(isinstance(p, str) for p in paths):
        raise ValueError(
            f"`layers` must be a dotted path or a list of dotted paths of block containers, got {layers!r}."
            f' Candidate container paths: {containers}. HINT: e.g. `layers="model.layers"`.'
        )
    resolved = []
    for path in paths:
        if path in modules:
            resolved.append(path)
            continue
        matches = [n for n in modules if n.endswith("." + path)]
        if len(matches) != 1:
            found = f"it matches {matches}" if matches else "no module has that name"
            raise ValueError(
                f"`layers={path!r}` must name one block container of {type(model).__name__}, but {found}."
                f" Candidate container paths: {containers}. HINT: pass one of the candidate paths."
            )
        resolved.append(matches[0])
    return resolved


def find_blocks(model: nn.Module, layers: str | Sequence[str] | None = None) -> LayerStack:
    """Find every repeated block stack of ``model``.

    Args:
        model: any ``nn.Module`` — a timm / HF model, a peft wrapper, a LightningModule holding one, your own model.
        layers: dotted path of a block container, or a list of them (one per stack), overriding the automatic
            search (``"model.layers"``; ``["encoder.block", "decoder.block"]``). A unique suffix of a module name
            is accepted (``"encoder.layer"`` finds ``"model.bert.encoder.layer"``).

    Returns:
        The :class:`LayerStack` of ``model``: all blocks of all stacks, in forward order.

    Raises:
        ValueError: if ``layers`` names no container of blocks, or if nothing in the model looks like one.
            The message lists the candidate container paths seen.

    Example::

        >>> from transformers import T5Config, T5Model
        >>> t5 = T5Model(T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, vocab_size=32))
        >>> stack = find_blocks(t5)
        >>> stack.paths, stack.names[2]
        (['encoder.block', 'decoder.block'], 'decoder.block.0')
        >>> [u.role for u in stack.units(0)][:4]
        ['q', 'k', 'v', 'o']
    """
    modules = dict(model.named_modules())
    containers = [name for name, module in modules.items() if _is_container(module) and len(module) > 0]
    if layers is not None:
        blocks: list[tuple[str, nn.Module]] = []
        for name in resolve_paths(model, layers):
            container = modules[name]
            found = None
            if _is_container(container):
                found = _stage_blocks(name, container) or _children_blocks(name, container, min_len=1)
            if found is None:
                raise ValueError(
                    f"`layers={name!r}` resolves to {type(container).__name__}, which is not a ModuleList/Sequential"
                    " of same-class blocks with parameters (or of stages holding `blocks`)."
                    f" Candidate container paths: {containers}. HINT: pass one of the candidate paths."
                )
            blocks += found
        return LayerStack(model, *_unzip(_in_registration_order(model, blocks)), source="explicit")

    for rule, source in (
        (_timm_blocks, "timm group_matcher"),
        (_transformers_blocks, "transformers _no_split_modules"),
        (_torch_transformer_blocks, "nn.Transformer"),
    ):
        found = rule(modules)
        if found:
            found = _in_registration_order(model, _refine(found))
            return LayerStack(model, *_unzip(found), source=source)
    shared = _shared_blocks(model, modules)
    if shared is not None:
        found, reason = shared
        return LayerStack(model, *_unzip(found), source="transformers config", shared=reason)
    heuristic = _heuristic_blocks(modules, containers)
    if heuristic is not None:
        found, source = heuristic
        return LayerStack(model, *_unzip(_in_registration_order(model, _refine(found))), source=source)
    raise ValueError(
        f"Could not find the repeated blocks of {type(model).__name__}: it declares none (no timm `group_matcher`,"
        " transformers `_no_split_modules` or nn.TransformerEncoder) and has no ModuleList/Sequential of same-class"
        f" children with parameters. Candidate container paths seen: {containers or 'none'}."
        ' HINT: pass `layers=` with the dotted path of the block container(s), e.g. `layers="model.layers"` or'
        ' `layers=["encoder.layers", "decoder.layers"]`.'
    )


def _unzip(blocks: list[tuple[str, nn.Module]]) -> tuple[list[str], list[nn.Module]]:
    return [n for n, _ in blocks], [b for _, b in blocks]
