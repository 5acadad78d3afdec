"""The pruning plan: what to keep, decided from the masks and PEFT scores, serialisable and re-applicable."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft._compat import compile_wrappers_lifted
from lightning_peft.adapters import adapter_modules
from lightning_peft.layout.peft_layers import lora_rank, lora_ranks
from lightning_peft.pruning.surgery import (
    ParameterReplacements,
    find_lora_layers,
    find_sites,
    prune_adapter_units,
    prune_attention,
    prune_lora_ranks,
    prune_mlp,
    remove_adapter,
    remove_lora,
)

__all__ = [
    "PruningPlan",
    "apply_pruning_plan",
    "choose_heads",
    "choose_lora",
    "choose_neurons",
    "plan_applied",
    "restore_pruned_architecture",
]


@dataclass
class PruningPlan:
    """What survives pruning, by module path (relative to the root the plan is applied to).

    Attributes:
        heads: ``{attention path: kept query-head indices}`` (original numbering).
        neurons: ``{MLP path: kept neuron indices}``.
        lora_removed: paths of LoRA layers replaced by their base Linear.
        lora_ranks: ``{LoRA layer path: {adapter: kept rank indices}}``.
        adapters_removed: paths of :mod:`lightning_peft.adapters` adapters taken out of the model.
        adapter_units: ``{bottleneck adapter path: kept bottleneck-unit indices}``.
        layers: the ``layers=`` path used to find the blocks (``None``: automatic).

    A plan is plain data (:meth:`to_dict` / :meth:`from_dict`), stored in checkpoints so that a fresh, unpruned
    model reaches the pruned architecture before its weights load.

    Example::

        >>> plan = PruningPlan(heads={"blocks.0.attn": [0, 2]}, neurons={"blocks.0.mlp": [1, 3, 4]})
        >>> PruningPlan.from_dict(plan.to_dict()) == plan
        True
    """

    heads: dict[str, list[int]] = field(default_factory=dict)
    neurons: dict[str, list[int]] = field(default_factory=dict)
    lora_removed: list[str] = field(default_factory=list)
    lora_ranks: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    adapters_removed: list[str] = field(default_factory=list)
    adapter_units: dict[str, list[int]] = field(default_factory=dict)
    layers: str | list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain Python containers (for checkpoints, JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningPlan:
        """Rebuild a plan from :meth:`to_dict` output."""
        return cls(
            heads={k: [int(i) for i in v] for k, v in data.get("heads", {}).items()},
            neurons={k: [int(i) for i in v] for k, v in data.get("neurons", {}).items()},
            lora_removed=[str(p) for p in data.get("lora_removed", [])],
            lora_ranks={
                p: {a: [int(i) for i in r] for a, r in d.items()} for p, d in data.get("lora_ranks", {}).items()
            },
            adapters_removed=[str(p) for p in data.get("adapters_removed", [])],
            adapter_units={k: [int(i) for i in v] for k, v in data.get("adapter_units", {}).items()},
            layers=data.get("layers"),
        )


def _n_pruned(ratio: float, n: int) -> int:
    """How many of ``n`` units a ratio prunes: rounded, and never all of them."""
    return min(int(round(ratio * n)), n - 1) if n > 0 else 0


def _ranked(scores: Tensor, descending: bool, generator: torch.Generator | None) -> Tensor:
    """Indices of ``scores`` in sorted order; ties are broken by a random permutation from ``generator``."""
    perm = torch.randperm(len(scores), generator=generator) if generator is not None else torch.arange(len(scores))
    return perm[torch.sort(scores[perm], descending=descending, stable=True).indices]


def choose_heads(
    site_masks: dict[str, tuple[Tensor, int]], ratio: float, generator: torch.Generator | None = None
) -> dict[str, list[int]]:
    """Per attention site, keep the heads of the ``1 - ratio`` most important key/value groups.

    Args:
        site_masks: ``{path: (mask of shape (num_heads,), group size)}``; a group's importance is the mean ``|m|``
            of its query heads (a group is one head without grouped-query attention).
        ratio: fraction of groups pruned in each layer (rounded; at least one group stays).
        generator: breaks ties between equal scores at random (``None``: lower index first).
    """
    kept = {}
    for path, (mask, group) in site_masks.items():
        scores = mask.detach().abs().float().cpu().view(-1, group).mean(dim=1)
        n_keep = len(scores) - _n_pruned(ratio, len(scores))
        order = _ranked(scores, True, generator)[:n_keep]
        kept[path] = sorted(int(h) for g in order.tolist() for h in range(g * group, (g + 1) * group))
    return kept


def choose_neurons(
    site_masks: dict[str, Tensor], ratio: float, generator: torch.Generator | None = None
) -> dict[str, list[int]]:
    """Prune the ``ratio`` fraction of all MLP neurons with the smallest ``|m|`` (a global quantile).

    Each MLP keeps at least its most important neuron; ``generator`` breaks ties between equal scores at random.
    """
    if not site_masks:
        return {}
    paths = list(site_masks)
    scores = [site_masks[p].detach().abs().float().cpu() for p in paths]
    flat = torch.cat(scores)
    n_prune = _n_pruned(ratio, len(flat))
    pruned = torch.zeros(len(flat), dtype=torch.bool)
    pruned[_ranked(flat, False, generator)[:n_prune]] = True
    kept, start = {}, 0
    for path, score in zip(paths, scores, strict=True):
        keep = (~pruned[start : start + len(score)]).nonzero().flatten().tolist()
        kept[path] = keep or [int(score.argmax())]
        start += len(score)
    return kept


def choose_lora(
    module_scores: dict[str, float],
    rank_scores: dict[str, dict[str, Tensor]],
    module_ratio: float,
    rank_ratio: float,
) -> tuple[list[str], dict[str, dict[str, list[int]]]]:
    """Remove the ``module_ratio`` fraction of LoRA layers of lowest score; in the others keep the top ranks.

    Returns:
        ``(removed paths, {path: {adapter: kept ranks}})``; each kept layer keeps ``r - round(rank_ratio * r)``
        ranks (at least one) of highest Taylor score. Layers never scored are kept whole.
    """
    paths = sorted(module_scores, key=lambda p: (module_scores[p], p))
    removed = sorted(paths[: _n_pruned(module_ratio, len(paths))]) if module_ratio > 0 else []
    ranks: dict[str, dict[str, list[int]]] = {}
    if rank_ratio > 0:
        for path, adapters in rank_scores.items():
            if path in removed:
                continue
            for adapter, score in adapters.items():
                n_keep = len(score) - _n_pruned(rank_ratio, len(score))
                order = torch.sort(score.float(), descending=True, stable=True).indices[:n_keep]
                ranks.setdefault(path, {})[adapter] = sorted(order.tolist())
    return removed, ranks


def _sync_configs(sites) -> None:
    """Keep an HF decoder config's head counts true when every attention layer sharing it has the same counts.

    Only for configs that state ``num_key_value_heads`` (decoders): caches (a static KV cache) are sized from them
    and some attentions read them in forward (Phi-3 splits its fused projection at ``num_attention_heads x
    head_dim``). The head size is written as ``head_dim`` first when the config derives it from the head count, so it
    stays true. BERT-style configs derive the head size from ``num_attention_heads`` and are left as they are.
    """
    by_config: dict[int, list] = {}
    for site in sites:
        config = getattr(site.module, "config", None)
        if config is not None and hasattr(config, "num_key_value_heads"):
            by_config.setdefault(id(config), []).append(site)
    for group in by_config.values():
        counts = {(s.num_heads, s.num_kv_heads, s.head_dim) for s in group}
        if len(counts) == 1:
            config = group[0].module.config
            heads, kv_heads, head_dim = counts.pop()
            if not getattr(config, "head_dim", None):
                config.head_dim = head_dim
            config.num_attention_heads, config.num_key_value_heads = heads, kv_heads


def apply_pruning_plan(root: nn.Module, plan: PruningPlan | dict[str, Any]) -> ParameterReplacements:
    """Make ``root`` (unpruned, with the architecture the plan was made on) as small as the plan says, in place.

    Call it on a fresh model before loading the state dict of a pruned checkpoint::

        apply_pruning_plan(module, checkpoint["pruning_plan"])
        module.load_state_dict(checkpoint["state_dict"])

    Args:
        root: the model or LightningModule the plan's paths are relative to.
        plan: a :class:`PruningPlan` or its :meth:`~PruningPlan.to_dict` form.

    Returns:
        The record of replaced and removed parameters (for :func:`~lightning_peft.pruning.replace_in_optimizer`).

    Raises:
        ValueError: if a path of the plan is not a prunable site or LoRA layer of ``root``.

    Example::

        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=4, pretrained=False)
        >>> _ = apply_pruning_plan(vit, {"heads": {"blocks.1.attn": [0, 3]}, "neurons": {"blocks.0.mlp": [0, 5]}})
        >>> vit.blocks[1].attn.num_heads, vit.blocks[1].attn.qkv.out_features, vit.blocks[0].mlp.fc2.in_features
        (2, 48, 2)
    """
    with compile_wrappers_lifted(root) as plain:
        return _apply(plain, PruningPlan.from_dict(plan) if isinstance(plan, dict) else plan)


def _apply(root: nn.Module, plan: PruningPlan) -> ParameterReplacements:
    record = ParameterReplacements()
    sites = find_sites(root, plan.layers)
    attention = {s.path: s for s in sites.attention}
    mlps = {s.path: s for s in sites.mlp}
    unknown = [p for p in plan.heads if p not in attention] + [p for p in plan.neurons if p not in mlps]
    if unknown:
        raise ValueError(
            f"the pruning plan names sites that this model does not have: {unknown[:4]}. Found attention sites"
            f" {list(attention)[:3]}..., MLP sites {list(mlps)[:3]}... HINT: apply the plan to the same architecture"
            " it was made on, before loading the pruned weights."
        )
    for path, kept in plan.heads.items():
        if len(kept) < attention[path].num_heads:
            prune_attention(attention[path], kept, record)
    _sync_configs(sites.attention)
    for path, kept in plan.neurons.items():
        if len(kept) < mlps[path].hidden:
            prune_mlp(mlps[path], kept, record)
    lora = find_lora_layers(root)
    missing = [p for p in [*plan.lora_ranks, *plan.lora_removed] if p not in lora]
    if missing:
        raise ValueError(
            f"the pruning plan names LoRA layers that this model does not have: {missing[:4]}."
            " HINT: attach the same peft config as the pruned run before applying the plan."
        )
    for path, adapters in plan.lora_ranks.items():
        for adapter, kept in adapters.items():
            if len(kept) < lora_rank(lora[path], adapter):
                prune_lora_ranks(lora[path], adapter, kept, record)
    for path in plan.lora_removed:
        remove_lora(root, path, record)
    if plan.adapters_removed or plan.adapter_units:
        adapters = dict(adapter_modules(root))
        missing = [p for p in [*plan.adapter_units, *plan.adapters_removed] if p not in adapters]
        if missing:
            raise ValueError(
                f"the pruning plan names adapters that this model does not have: {missing[:4]}."
                " HINT: add the same adapters (`add_adapters`) as the pruned run before applying the plan."
            )
        for path, kept in plan.adapter_units.items():
            if len(kept) < adapters[path].down.out_features:
                prune_adapter_units(adapters[path], kept, record)
        for path in plan.adapters_removed:
            remove_adapter(root, path, record)
    return record


def plan_applied(root: nn.Module, plan: PruningPlan | dict[str, Any]) -> bool:
    """Whether ``root`` has the architecture ``plan`` leads to: every part of it, not only heads and neurons.

    Checked: the kept heads and neurons of every site, the ranks of every LoRA layer the plan keeps, that the
    removed LoRA layers and adapters are gone, and the bottleneck sizes of the kept adapters.

    Example::

        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=4, pretrained=False)
        >>> plan = {"heads": {"blocks.1.attn": [0, 3]}}
        >>> before = plan_applied(vit, plan)
        >>> _ = apply_pruning_plan(vit, plan)
        >>> before, plan_applied(vit, plan)
        (False, True)
    """
    with compile_wrappers_lifted(root) as plain:
        return _applied(plain, PruningPlan.from_dict(plan) if isinstance(plan, dict) else plan)


def _applied(root: nn.Module, plan: PruningPlan) -> bool:
    sites = find_sites(root, plan.layers)
    heads = {s.path: s.num_heads for s in sites.attention}
    hidden = {s.path: s.hidden for s in sites.mlp}
    if any(heads.get(p) != len(k) for p, k in plan.heads.items()):
        return False
    if any(hidden.get(p) != len(k) for p, k in plan.neurons.items()):
        return False
    lora = find_lora_layers(root)
    if any(p in lora for p in plan.lora_removed):
        return False
    for path, adapters in plan.lora_ranks.items():
        layer = lora.get(path)
        if layer is None or any(lora_ranks(layer).get(a) != len(k) for a, k in adapters.items()):
            return False
    if plan.adapters_removed or plan.adapter_units:
        present = dict(adapter_modules(root))
        if any(p in present for p in plan.adapters_removed):
            return False
        if any(p not in present or present[p].down.out_features != len(k) for p, k in plan.adapter_units.items()):
            return False
    return True


def restore_pruned_architecture(module: nn.Module, checkpoint: Mapping[str, Any]) -> bool:
    """Give a fresh module the pruned architecture of ``checkpoint`` before its weights load (one line in a hook).

    A checkpoint written after :class:`~lightning_peft.callbacks.EarlyPruning` pruned the model holds smaller
    weights and its plan (``checkpoint["pruning_plan"]``); a module built by its ``__init__`` is unpruned, so
    ``load_state_dict`` fails with size mismatches. Called from ``on_load_checkpoint``, which Lightning runs right
    before the weights load in ``load_from_checkpoint`` and in ``trainer.fit|validate|test|predict(ckpt_path=...)``,
    it applies the plan; a module that already has the checkpoint's shapes (or a checkpoint without a plan) is left
    as it is. The ready modules of :mod:`lightning_peft.modules` call it already.

    Args:
        module: the LightningModule (or model) the checkpoint's ``state_dict`` belongs to.
        checkpoint: the loaded checkpoint dict.

    Returns:
        Whether the plan was applied.

    Example::

        >>> import lightning.pytorch as pl
        >>> class MyModule(pl.LightningModule):
        ...     def on_load_checkpoint(self, checkpoint):
        ...         restore_pruned_architecture(self, checkpoint)
    """
    plan = checkpoint.get("pruning_plan")
    if plan is None:
        return False
    weights = checkpoint.get("state_dict")
    if weights is not None:
        own = module.state_dict()
        if all(name in own and own[name].shape == value.shape for name, value in weights.items()):
            return False
    apply_pruning_plan(module, plan)
    return True
