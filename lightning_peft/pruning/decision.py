"""The decision: which heads, neurons and PEFT parts go, and the loss check that lowers the ratios until it holds.

:func:`make_plan` turns the scores of the estimation into a :class:`~lightning_peft.pruning.PruningPlan` at given
ratios. :func:`decide` measures the loss on a few batches before the cut and under the cut
(:func:`simulated_cut`); while the cut costs more than the tolerance, the kind (heads, neurons or PEFT) whose cut
alone costs most has its ratios halved, until it fits or that kind is spared entirely.

The simulated cut is the real one wherever that costs no copy of the model: LoRA ranks and adapter bottleneck units
are cut by the surgery's own functions on copies of the small ``A`` / ``B`` and ``down`` / ``up`` modules, put in
place for the measurement and taken out again. Heads and neurons are cut through the masks (0 for a pruned unit, 1
for a kept one), which compute what the sliced projections compute -- :class:`~lightning_peft.pruning.verify.
SiteVerifier` proves it on a copy of every block before a site may be pruned -- without copying the large
projections. A removed LoRA layer or adapter is switched off through its output factor (peft's ``scaling``, the
adapter's ``scale``): its hooks stay where they are (the masks' pre-hooks may sit on a LoRA wrapper), and a factor
of 0 adds exactly nothing.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Container, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_peft._batch import batch_loss
from lightning_peft.adapters import adapter_modules
from lightning_peft.layout.peft_layers import lora_ranks, lora_scalings, lora_slots, set_lora_rank, set_lora_scalings
from lightning_peft.pruning.adapter_importance import AdapterImportance
from lightning_peft.pruning.masks import PruningMasks
from lightning_peft.pruning.peft_importance import LoraImportance
from lightning_peft.pruning.plan import PruningPlan, choose_heads, choose_lora, choose_neurons
from lightning_peft.pruning.surgery import find_lora_layers, prune_adapter_units, prune_lora_ranks

__all__ = ["HALVINGS", "KINDS", "cut_of", "decide", "evaluation", "make_plan", "mean_loss", "simulated_cut"]

# the kinds the loss check lowers separately, with the ratio arguments of each
KINDS = {"heads": ("head_ratio",), "neurons": ("neuron_ratio",), "peft": ("peft_module_ratio", "peft_rank_ratio")}
HALVINGS = 3  # the loss check halves a kind's ratios this many times, then spares that kind entirely


def make_plan(
    ratios: Mapping[str, float],
    masks: PruningMasks | None,
    unit_scores: tuple[list[Tensor], list[Tensor]] | None,
    lora: LoraImportance | None,
    adapters: AdapterImportance | None,
    excluded: Container[str] = (),
    seed: int = 0,
    layers: str | list[str] | None = None,
) -> PruningPlan:
    """The plan the scores give at ``ratios``.

    Args:
        ratios: ``head_ratio``, ``neuron_ratio``, ``peft_module_ratio`` and ``peft_rank_ratio`` (fractions pruned).
        masks: the head / neuron masks (their sites), or ``None`` when no head or neuron is pruned.
        unit_scores: ``(head scores, neuron scores)`` per site of ``masks``.
        lora: the LoRA layers' scores, or ``None``.
        adapters: the adapters' scores, or ``None``.
        excluded: site paths left whole (their pruned copy did not compute what the masked one did).
        seed: seeds the generator that breaks ties between equal scores.
        layers: the ``layers=`` the sites were found with (recorded in the plan).
    """
    generator = torch.Generator().manual_seed(seed)
    heads, neurons, removed, ranks = {}, {}, [], {}
    if masks is not None and unit_scores is not None:
        head_scores, neuron_scores = unit_scores
        heads = choose_heads(
            {
                s.path: (score, s.group_size)
                for s, score in zip(masks.attention_sites, head_scores, strict=True)
                if s.path not in excluded
            },
            ratios["head_ratio"],
            generator,
        )
        neurons = choose_neurons(
            {s.path: score for s, score in zip(masks.mlp_sites, neuron_scores, strict=True) if s.path not in excluded},
            ratios["neuron_ratio"],
            generator,
        )
    if lora is not None:
        removed, ranks = choose_lora(
            lora.module_scores(), lora.rank_scores(), ratios["peft_module_ratio"], ratios["peft_rank_ratio"]
        )
    adapters_removed, adapter_units = [], {}
    if adapters is not None:
        adapters_removed, units = choose_lora(
            adapters.module_scores(), adapters.rank_scores(), ratios["peft_module_ratio"], ratios["peft_rank_ratio"]
        )
        adapter_units = {path: kept["adapter"] for path, kept in units.items()}
    return PruningPlan(
        heads=heads,
        neurons=neurons,
        lora_removed=removed,
        lora_ranks=ranks,
        adapters_removed=adapters_removed,
        adapter_units=adapter_units,
        layers=layers,
    )


def cut_of(plan: PruningPlan, kind: str) -> Any:
    """The part of ``plan`` that cuts ``kind`` (``heads``, ``neurons`` or ``peft``), comparable with ``==``."""
    if kind == "heads":
        return plan.heads
    if kind == "neurons":
        return plan.neurons
    return plan.lora_removed, plan.lora_ranks, plan.adapters_removed, plan.adapter_units


@contextlib.contextmanager
def evaluation(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Eval mode (no dropout), no gradients, the run's precision; training flags restored afterwards."""
    modes = {module: module.training for module in pl_module.modules()}
    pl_module.eval()
    try:
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


def mean_loss(pl_module: pl.LightningModule, batches: list[Any]) -> float:
    """Mean loss over ``batches``: ``compute_loss(batch)`` if the module has one, else ``training_step``."""
    losses = []
    for index, batch in enumerate(batches):
        output = batch_loss(
            pl_module, batch, index, "EarlyPruning's loss check", ", or turn the check off: `max_loss_increase=None`"
        )
        losses.append(float(output.detach().float().mean()))
    return sum(losses) / len(losses)


@contextlib.contextmanager
def _on_copies(slots: list[tuple[nn.Module, str]]) -> Iterator[None]:
    """Put a deep copy of ``getattr(owner, name)`` in place for every slot; the originals come back on exit."""
    originals = [(owner, name, getattr(owner, name)) for owner, name in slots]
    try:
        for owner, name, module in originals:
            setattr(owner, name, copy.deepcopy(module))
        yield
    finally:
        for owner, name, module in originals:
            setattr(owner, name, module)


@contextlib.contextmanager
def simulated_cut(root: nn.Module, plan: PruningPlan, masks: PruningMasks | None) -> Iterator[None]:
    """``root`` computes as it will after ``plan`` is applied (see the module docstring); restored on exit.

    Args:
        root: the model the plan's paths are relative to (LoRA layers and adapters are looked up there).
        plan: the plan to simulate.
        masks: the installed head / neuron masks; every mask of a site the plan leaves whole is set to 1.
    """
    saved_masks: list[tuple[Tensor, Tensor]] = []
    restore: list[Callable[[], None]] = []
    slots: list[tuple[nn.Module, str]] = []
    with torch.no_grad():
        if masks is not None:
            kept_by_mask = [
                *zip(masks.heads, (plan.heads.get(s.path) for s in masks.attention_sites), strict=True),
                *zip(masks.neurons, (plan.neurons.get(s.path) for s in masks.mlp_sites), strict=True),
            ]
            for mask, kept in kept_by_mask:
                saved_masks.append((mask, mask.detach().clone()))
                mask.data.fill_(1.0)
                if kept is not None:
                    drop = torch.ones(len(mask), dtype=torch.bool)
                    drop[kept] = False
                    mask.data.index_fill_(0, drop.nonzero().flatten().to(mask.device), 0.0)
    lora = find_lora_layers(root) if plan.lora_removed or plan.lora_ranks else {}
    adapters = dict(adapter_modules(root)) if plan.adapters_removed or plan.adapter_units else {}
    for path in plan.lora_removed:
        scalings = lora_scalings(lora[path])
        set_lora_scalings(lora[path], dict.fromkeys(scalings, 0.0))
        restore.append(lambda layer=lora[path], values=scalings: set_lora_scalings(layer, values))
    for path in plan.adapters_removed:
        restore.append(lambda adapter=adapters[path], scale=adapters[path].scale: setattr(adapter, "scale", scale))
        adapters[path].scale = 0.0
    for path, kept_ranks in plan.lora_ranks.items():
        slots += [slot for adapter in kept_ranks for slot in lora_slots(lora[path], adapter)]
    slots += [(adapters[path], name) for path in plan.adapter_units for name in ("down", "up")]
    try:
        with _on_copies(slots):
            for path, kept_ranks in plan.lora_ranks.items():
                for adapter, kept in kept_ranks.items():
                    rank = lora_ranks(lora[path])[adapter]
                    restore.append(
                        lambda layer=lora[path], adapter=adapter, rank=rank: set_lora_rank(layer, adapter, rank)
                    )
                    prune_lora_ranks(lora[path], adapter, kept)
            for path, kept in plan.adapter_units.items():
                prune_adapter_units(adapters[path], kept)
            yield
    finally:
        with torch.no_grad():
            for mask, value in saved_masks:
                mask.data.copy_(value)
        for undo in reversed(restore):
            undo()


def decide(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    batches: list[Any],
    *,
    requested: dict[str, float],
    tolerance: float | None,
    plan_at: Callable[[Mapping[str, float] | None], PruningPlan],
    masks: PruningMasks | None,
    present: Mapping[str, bool],
    loss: Callable[[pl.LightningModule, list[Any]], float] = mean_loss,
) -> dict[str, Any]:
    """Choose the plan: the ratios asked for, lowered per kind until the cut costs at most ``tolerance``.

    Args:
        trainer: the running Trainer (for the precision context).
        pl_module: the LightningModule, still unpruned, masks installed.
        batches: the batches the loss is measured on.
        requested: the ratios asked for, by argument name (see :data:`KINDS`).
        tolerance: the largest relative loss increase allowed; ``None`` switches the check off.
        plan_at: the plan at some ratios (``None``: the requested ones).
        masks: the installed head / neuron masks.
        present: ``{kind: whether the model has something of that kind to prune}``.
        loss: ``loss(pl_module, batches)``, the mean loss (default :func:`mean_loss`).

    Returns:
        ``{"plan": plan as a dict, "check": report}``; the report holds ``loss_before``, ``loss_after_cut``,
        ``increase`` (relative), ``requested`` and ``used`` ratios, every try and what was spared and why.
    """
    if tolerance is None or not batches:
        reason = "off (`max_loss_increase=None`)" if tolerance is None else "no batch to measure"
        return {"plan": plan_at(None).to_dict(), "check": {"enabled": False, "reason": reason}}
    used = dict(requested)
    halvings = dict.fromkeys(KINDS, 0)
    tries: list[dict[str, Any]] = []
    alone: dict[tuple, float] = {}
    spared: list[str] = []
    with evaluation(trainer, pl_module):
        before = loss(pl_module, batches)

        def increase(ratios: dict[str, float]) -> tuple[PruningPlan, float]:
            plan = plan_at(ratios)
            with simulated_cut(pl_module, plan, masks):
                after = loss(pl_module, batches)
            return plan, (after - before) / max(abs(before), 1e-12)

        while True:
            plan, rise = increase(used)
            tries.append({"ratios": dict(used), "increase": rise})
            active = [k for k in KINDS if present[k] and any(used[n] > 0 for n in KINDS[k])]
            if rise <= tolerance or not active or not math.isfinite(before):
                break
            cost = {}
            for kind in active:  # what each kind's cut costs alone decides which one gives way
                only = {n: (used[n] if n in KINDS[kind] else 0.0) for n in used}
                key = tuple(sorted(only.items()))
                if key not in alone:
                    alone[key] = increase(only)[1]
                cost[kind] = alone[key]
            worst = max(active, key=lambda k: cost[k])
            old = {n: used[n] for n in KINDS[worst]}
            while True:  # halve until the cut of that kind changes (a ratio rounds to whole heads / groups)
                halvings[worst] += 1
                for name in KINDS[worst]:
                    used[name] = 0.0 if halvings[worst] > HALVINGS else used[name] / 2
                if halvings[worst] > HALVINGS or cut_of(plan_at(used), worst) != cut_of(plan, worst):
                    break
            spared.append(
                f"{worst}: {', '.join(f'{n} {old[n]:.3g} -> {used[n]:.3g}' for n in old)} (the whole cut"
                f" {rise:+.1%} > {tolerance:.1%}; {worst} alone cost most, {cost[worst]:+.1%})"
            )
    check = {
        "enabled": True,
        "tolerance": tolerance,
        "batches": len(batches),
        "loss_before": before,
        "loss_after_cut": before * (1 + tries[-1]["increase"]),
        "increase": tries[-1]["increase"],
        "requested": requested,
        "used": used,
        "tries": tries,
        "spared": spared,
    }
    return {"plan": plan.to_dict(), "check": check}
