"""Structured pruning during fine-tuning: masks, importance scores, the pruning plan and the surgery.

The :class:`~lightning_peft.callbacks.EarlyPruning` callback drives these pieces; they are usable alone, e.g. to
re-create a pruned architecture before loading a pruned checkpoint (:func:`apply_pruning_plan`).
"""

from lightning_peft.pruning.adapter_importance import AdapterImportance, prune_adapter_units, remove_adapter
from lightning_peft.pruning.masks import PruningMasks
from lightning_peft.pruning.peft_importance import LoraImportance, find_lora_layers, prune_lora_ranks, remove_lora
from lightning_peft.pruning.plan import (
    PruningPlan,
    apply_pruning_plan,
    choose_heads,
    choose_lora,
    choose_neurons,
    plan_applied,
    restore_pruned_architecture,
)
from lightning_peft.pruning.surgery import (
    AttentionSite,
    MlpSite,
    ParameterReplacements,
    find_sites,
    prune_attention,
    prune_linear,
    prune_mlp,
    replace_in_optimizer,
)

__all__ = [
    "AdapterImportance",
    "AttentionSite",
    "LoraImportance",
    "MlpSite",
    "ParameterReplacements",
    "PruningMasks",
    "PruningPlan",
    "apply_pruning_plan",
    "plan_applied",
    "choose_heads",
    "choose_lora",
    "choose_neurons",
    "find_lora_layers",
    "find_sites",
    "prune_attention",
    "prune_linear",
    "prune_lora_ranks",
    "prune_adapter_units",
    "prune_mlp",
    "remove_adapter",
    "remove_lora",
    "replace_in_optimizer",
    "restore_pruned_architecture",
]
