"""Structured pruning during fine-tuning: masks, importance scores, the decision, the plan and the surgery.

The :class:`~lightning_peft.callbacks.EarlyPruning` callback drives these pieces; they are usable alone, e.g. to
re-create a pruned architecture before loading a pruned checkpoint (:func:`apply_pruning_plan`).

- :mod:`.masks`: trainable head / neuron masks; :mod:`.peft_importance`, :mod:`.adapter_importance`: the scores of
  LoRA layers and adapters;
- :mod:`.decision`: the plan from the scores and the loss check that lowers the ratios;
- :mod:`.plan`: the plan as data, applied to a model;
- :mod:`.surgery`: every cut (heads, neurons, LoRA ranks and layers, adapters);
- :mod:`.carry_over`: optimizer state, DDP and the trainable-set controller after a cut;
- :mod:`.report`: the summary and the mask plot; :mod:`.verify`: a cut proven on a copy of each block.
"""

from lightning_peft.pruning.adapter_importance import AdapterImportance
from lightning_peft.pruning.carry_over import carry_over, replace_in_optimizer
from lightning_peft.pruning.masks import PruningMasks
from lightning_peft.pruning.peft_importance import LoraImportance
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
    find_lora_layers,
    find_sites,
    prune_adapter_units,
    prune_attention,
    prune_linear,
    prune_lora_ranks,
    prune_mlp,
    remove_adapter,
    remove_lora,
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
    "carry_over",
    "choose_heads",
    "choose_lora",
    "choose_neurons",
    "find_lora_layers",
    "find_sites",
    "plan_applied",
    "prune_adapter_units",
    "prune_attention",
    "prune_linear",
    "prune_lora_ranks",
    "prune_mlp",
    "remove_adapter",
    "remove_lora",
    "replace_in_optimizer",
    "restore_pruned_architecture",
]
