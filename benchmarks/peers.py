"""The peer methods the benchmarks compare with, built one way for every script.

* activation checkpointing of every block: timm ``set_grad_checkpointing()``, transformers
  ``gradient_checkpointing_enable()`` (non-reentrant);
* saved activations in CPU memory (``torch.autograd.graph.save_on_cpu``): ``MeasuringCallback(offload=True)`` of
  :mod:`benchmarks.harness` applies it, since it has to share the saved-tensor hooks with the counter;
* BAdam (package ``badam``): ``BlockOptimizer`` around AdamW, one block trains at a time, switching every
  ``switch_every`` steps in random order; embeddings and head frozen unless named in ``active_modules``;
* GaLore (package ``galore-torch``): ``GaLoreAdamW`` with the gradients of the blocks' 2-D weights projected;
* bitsandbytes ``AdamW8bit`` (8-bit optimizer state).

BAdam and GaLore need the ``bench`` extra (``pip install badam galore-torch``). A LightningModule uses them by
building its optimizer with :func:`build_optimizer` and, for BAdam, stepping it with :func:`optimizer_step`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_peft.layout import find_blocks

OPTIMIZERS = ("adamw", "adamw8bit", "badam", "galore")
#: The optimizers a LightningModule steps with :func:`optimizer_step` (closure first) instead of Lightning's own.
CLOSURE_FIRST = frozenset({"badam"})


@dataclass(frozen=True)
class GaLoreSettings:
    """GaLore's projection of the blocks' 2-D weight gradients: rank, steps between new projections, scale."""

    rank: int
    update_proj_gap: int
    scale: float


#: What users would pick instead, and combinations with them, as the benchmarks name them.
PEERS = (
    "full_checkpointing",
    "full_offload",
    "badam",
    "galore",
    "lisa_checkpointing",
    "full_int8_checkpointing",
)


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of every block: timm's ``set_grad_checkpointing`` or transformers'
    ``gradient_checkpointing_enable`` (non-reentrant, so frozen inputs and saved-tensor hooks work)."""
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    elif hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 (the older name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise TypeError(
            f"{type(model).__name__} has neither `set_grad_checkpointing` (timm) nor `gradient_checkpointing_enable`"
            " (transformers). HINT: pass the timm or transformers model itself, not a wrapper around it."
        )


def adamw8bit() -> type[torch.optim.Optimizer]:
    """bitsandbytes' ``AdamW8bit``, with a hint when bitsandbytes is missing."""
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ImportError(
            "AdamW8bit needs bitsandbytes. HINT: `pip install bitsandbytes`, or leave the method out with `--methods`."
        ) from error
    return bnb.optim.AdamW8bit


def build_optimizer(
    module: nn.Module,
    kind: str,
    lr: float,
    weight_decay: float = 0.01,
    min_8bit_size: int = 4096,
    switch_every: int = 50,
    active_modules: Sequence[str] = (),
    galore: GaLoreSettings | None = None,
) -> torch.optim.Optimizer:
    """The optimizer ``kind`` (one of :data:`OPTIMIZERS`) over every parameter of ``module`` that trains now.

    Every trainable parameter goes in, also for BAdam and GaLore: callbacks that freeze blocks afterwards (LISA)
    need them all in the optimizer. ``weight_decay`` is AdamW's (torch's default 0.01); GaLore's AdamW has its own
    default, 0, and keeps it, as in its package.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw8bit":
        return adamw8bit()(params, lr=lr, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
    if kind == "badam":
        from badam import BlockOptimizer

        # BAdam expects bf16 weights and keeps a float32 copy of the active block (counted as optimizer state)
        warnings.filterwarnings("ignore", message="BAdam expect model to be loaded in fp16/bf16")
        return BlockOptimizer(
            base_optimizer=torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
            named_parameters_list=list(module.named_parameters()),
            block_prefix_list=[[f"{name}."] for name in find_blocks(module).names],
            switch_block_every=switch_every,
            switch_mode="random",
            active_modules=list(active_modules),
            verbose=0,
        )
    if kind == "galore":
        from galore_torch import GaLoreAdamW

        if galore is None:
            raise ValueError("`galore` settings are needed for the GaLore optimizer. HINT: pass GaLoreSettings(...).")
        stack = find_blocks(module)
        inside = {n for i in range(len(stack)) for n in stack.block_parameter_names(i)}
        projected = [p for n, p in module.named_parameters() if n in inside and p.dim() == 2 and p.requires_grad]
        regular = [p for p in params if all(p is not q for q in projected)]
        groups = [
            {"params": regular},
            {
                "params": projected,
                "rank": galore.rank,
                "update_proj_gap": galore.update_proj_gap,
                "scale": galore.scale,
                "proj_type": "std",
            },
        ]
        return GaLoreAdamW(groups, lr=lr, no_deprecation_warning=True)
    raise ValueError(f"`kind` must be one of {OPTIMIZERS}, got {kind!r}.")


def optimizer_step(optimizer: Any, optimizer_closure: Callable[[], Any]) -> None:
    """Step BAdam with its closure run first: it copies the gradients onto its float32 block before its base
    optimizer's step, so they must exist by then (what its own trainer integration does)."""
    optimizer_closure()
    optimizer.step()
