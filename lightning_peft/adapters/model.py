"""Insert adapters into the blocks of a model, list them, and mark them as the only trainable parameters."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_peft.adapters.bottleneck import Adapter, build_adapter
from lightning_peft.adapters.config import AdapterConfig
from lightning_peft.layout import block_anatomy, find_blocks, is_projection, out_features

__all__ = [
    "ADAPTER_CONTAINER",
    "add_adapters",
    "adapter_modules",
    "adapter_parameter_names",
    "adapters_per_block",
    "mark_only_adapters_as_trainable",
]

# Name of the ModuleDict each block gets: `<block>.adapters.attention` / `<block>.adapters.mlp`.
ADAPTER_CONTAINER = "adapters"

_HF_HEADS = ("classifier", "score")


class _InputStash:
    """Forward pre-hook on a sublayer's entry module: keeps the sublayer's input for a parallel adapter.

    A class rather than a closure, so models with adapters can be pickled (``ddp_spawn``) and deep-copied (the copy's
    hooks then point to the copy's adapters).
    """

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args and isinstance(args[0], Tensor):
            self.value = args[0]
        else:
            value = kwargs.get("hidden_states")
            if value is None:
                value = next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
            self.value = value

    def __getstate__(self) -> dict[str, Any]:
        return {"value": None}


class _AdapterHook:
    """Forward hook on a sublayer's output projection: adds the adapter's correction to the projection's output."""

    def __init__(self, adapter: Adapter, stash: _InputStash | None) -> None:
        self.adapter = adapter
        self.stash = stash

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if self.stash is None:  # sequential: adapt the sublayer's output
            return output + self.adapter(output)
        source, self.stash.value = self.stash.value, None
        if source is None:
            raise RuntimeError(
                f"The parallel adapter on {type(module).__name__} found no sublayer input: the entry module of its"
                " site did not run before the output projection. HINT: set `sites` in the AdapterConfig so that the"
                " entry module is the first module the sublayer calls."
            )
        return output + self.adapter(source)


def _resolve_site(block: nn.Module, location: str, config: AdapterConfig) -> tuple[nn.Module, nn.Module] | str:
    """(entry module, output projection) of a sublayer, from ``config.sites`` or the layout registry.

    The entry module's input is the sublayer's input (what a parallel adapter reads): the first projection of the
    self-attention (q or the fused qkv) or of the MLP. Returns why nothing was found otherwise.
    """
    if config.sites and location in config.sites:
        entry_path, exit_path = config.sites[location]
        try:
            return block.get_submodule(entry_path), block.get_submodule(exit_path)
        except AttributeError as error:
            return f"`sites` names a module the block does not have ({error})"
    anatomy = block_anatomy(block)
    if location == "attention":
        selfattention = [site for site in anatomy.attention if not site.cross]
        if selfattention:
            site = selfattention[0]
            return (site.qkv if site.qkv is not None else site.q), site.o
    else:
        if anatomy.mlp:
            site = anatomy.mlp[0]
            return site.in_projs[0], site.down
    seen = [f"{path}: {why}" for path, why in anatomy.unrecognised if why.lower().startswith(location[:3])]
    return f"the layout registry recognises no {location} in it" + (f" ({'; '.join(seen)})" if seen else "")


def _width(module: nn.Module, location: str, block_name: str) -> int:
    if not is_projection(module):
        raise ValueError(
            f"The {location} output projection of block {block_name!r} ({type(module).__name__}) is not a Linear /"
            " Conv1D layer. HINT: point `sites` at the Linear layer that ends the sublayer."
        )
    return out_features(module)


def add_adapters(model: nn.Module, config: AdapterConfig | None = None, freeze_base: bool = True) -> nn.Module:
    """Insert adapters into every block of ``model`` (in place) and return ``model``.

    Each block gets a ``ModuleDict`` named ``adapters`` with one adapter per location of ``config.layout``
    (``adapters.mlp``; Houlsby also ``adapters.attention``). The adapter acts right after the sublayer's output
    projection (attention out-projection, MLP down-projection), before dropout, layer scale and the residual
    connection; sequential adapters read that projection's output, parallel ones the sublayer's input. Forward hooks
    do the wiring, so no pre-trained module is replaced or renamed and pre-trained checkpoints load as before.

    Args:
        model: a timm ViT / DeiT (also timm-based AST), an HF BERT / ViT / AST / Llama-style model, a peft model or a
            LightningModule holding one.
        config: the adapter configuration (default: a sequential Pfeiffer bottleneck adapter, reduction 16).
        freeze_base: leave only the adapters and ``config.modules_to_save`` trainable, as ``peft.get_peft_model``
            does; ``False`` leaves ``requires_grad`` as it is (adapters train too).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: if the model already has adapters, or a block has no sublayer this function knows (the message
            lists the block's submodules; pass ``sites``).

    Example::

        >>> import timm, torch
        >>> from lightning_peft.adapters import AdapterConfig, add_adapters, adapter_modules
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> before = vit.eval()(x)
        >>> _ = add_adapters(vit, AdapterConfig(layout="houlsby", modules_to_save=["head"]))
        >>> [name for name, _ in adapter_modules(vit)]
        ['blocks.0.adapters.attention', 'blocks.0.adapters.mlp', 'blocks.1.adapters.attention', 'blocks.1.adapters.mlp']
        >>> torch.equal(vit(x), before)  # the adapters start as the identity
        True
    """
    config = config or AdapterConfig()
    if adapter_modules(model):
        raise ValueError(
            f"{type(model).__name__} already has adapters ({len(adapter_modules(model))} modules)."
            " HINT: call `add_adapters` once per model; build a fresh model for a different configuration."
        )
    stack = find_blocks(model, config.layers)
    for block_name, block in zip(stack.names, stack.blocks, strict=True):
        if hasattr(block, ADAPTER_CONTAINER):
            raise ValueError(
                f"Block {block_name!r} already has an attribute {ADAPTER_CONTAINER!r}."
                " HINT: the adapters need that name; rename the block's attribute."
            )
        container = nn.ModuleDict()
        for location in config.locations:
            site = _resolve_site(block, location, config)
            if isinstance(site, str):
                children = [name for name, _ in block.named_modules() if name][:30]
                raise ValueError(
                    f"Cannot find the {location} sublayer of block {block_name!r} ({type(block).__name__}): {site}."
                    f" Its modules: {children}. HINT: pass `sites={{'{location}': [entry module, output projection]}}`"
                    " in the AdapterConfig, or declare the block's layout once with"
                    " `lightning_peft.layout.register_layout`."
                )
            entry, exit_module = site
            width = _width(exit_module, location, block_name)
            adapter = build_adapter(
                config.peft_type,
                width,
                config.bottleneck_for(width),
                activation=config.resolved_activation,
                dropout=float(config.dropout),
                scale=config.scale,
                kernel_size=config.kernel_size,
                norm=config.norm,
            )
            reference = next(exit_module.parameters(), None)
            if reference is not None:
                adapter.to(device=reference.device, dtype=reference.dtype if reference.is_floating_point() else None)
            container[location] = adapter
            stash = None
            # the adapter keeps the handles of its hooks (they travel with it through deepcopy and pickling), so
            # removing it removes exactly its hooks
            adapter.hook_handles = []
            if config.placement == "parallel":
                stash = _InputStash()
                adapter.hook_handles.append(entry.register_forward_pre_hook(stash, with_kwargs=True))
            adapter.hook_handles.append(exit_module.register_forward_hook(_AdapterHook(adapter, stash)))
        block.add_module(ADAPTER_CONTAINER, container)
    if freeze_base:
        mark_only_adapters_as_trainable(model, _modules_to_save(model, config))
    return model


def _modules_to_save(model: nn.Module, config: AdapterConfig) -> list[str]:
    if config.modules_to_save:
        return list(config.modules_to_save)
    if config.task_type == "SEQ_CLS":
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        return [head for head in _HF_HEADS if head in names]
    return []


def adapter_modules(model: nn.Module) -> list[tuple[str, Adapter]]:
    """Every adapter of ``model`` as ``(name, module)``, in registration (depth) order.

    Example::

        >>> from torch import nn
        >>> adapter_modules(nn.Linear(2, 2))
        []
    """
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Adapter)]


def adapters_per_block(model: nn.Module, layers: str | None = None) -> list[list[tuple[str, Adapter]]]:
    """The adapters of each block of ``model`` (blocks as found by :func:`~lightning_peft.layout.find_blocks`).

    Example::

        >>> import timm
        >>> vit = add_adapters(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2))
        >>> [[name for name, _ in block] for block in adapters_per_block(vit)]
        [['blocks.0.adapters.mlp'], ['blocks.1.adapters.mlp']]
    """
    stack = find_blocks(model, layers)
    found = adapter_modules(model)
    return [[(n, m) for n, m in found if n.startswith(prefix + ".")] for prefix in stack.names]


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names of the adapter parameters of ``model`` (as in ``model.named_parameters()``)."""
    ids = {id(p) for _, module in adapter_modules(model) for p in module.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def mark_only_adapters_as_trainable(model: nn.Module, modules_to_save: Iterable[str] = ()) -> None:
    """Let only the adapters and the modules named in ``modules_to_save`` (names or name suffixes) train.

    Example::

        >>> import timm
        >>> vit = add_adapters(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2),
        ...                    freeze_base=False)
        >>> mark_only_adapters_as_trainable(vit, ["head"])
        >>> sorted({n.split(".")[0] for n, p in vit.named_parameters() if p.requires_grad})
        ['blocks', 'head']
    """
    patterns = list(modules_to_save)
    adapters = set(adapter_parameter_names(model))
    module_names = [name for name, _ in model.named_modules() if name]
    saved = {m for m in module_names if _matches(m, patterns)} if patterns else set()
    for name, param in model.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        keep = name in adapters or any(owner == s or owner.startswith(s + ".") for s in saved)
        param.requires_grad_(keep)
