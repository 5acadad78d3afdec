"""PEFT modules that HF peft does not offer: bottleneck adapters and the conformer adapter of PETL-AST.

LoRA and the other peft methods stay HF peft's; these adapters are inserted with one call::

    from lightning_peft.adapters import AdapterConfig, add_adapters

    add_adapters(model, AdapterConfig(peft_type="BOTTLENECK", layout="houlsby", placement="parallel"))

or, for the ready modules, from YAML: ``peft: {peft_type: BOTTLENECK, layout: pfeiffer, reduction_factor: 16}``.

Layouts: ``pfeiffer`` (one adapter after the MLP of each block) and ``houlsby`` (after the attention and after the
MLP); placements: ``sequential`` (reads the sublayer's output) and ``parallel`` (reads the sublayer's input). Types:
``BOTTLENECK`` (:class:`BottleneckAdapter`) and ``CONFORMER`` (:class:`ConformerAdapter`). Known block layouts: timm
ViT / DeiT (and timm-based AST), HF ViT / AST / BERT, Llama-style decoders; others through ``AdapterConfig.sites``.

API used by other methods (IST suppresses adapters, early pruning scores and prunes them):

- ``adapter_modules(model) -> list[(name, Adapter)]``: every adapter, in depth order; names end in
  ``.adapters.attention`` / ``.adapters.mlp`` under their block (``blocks.3.adapters.mlp``).
- ``adapters_per_block(model, layers=None) -> list[list[(name, Adapter)]]``: the same, grouped by the blocks that
  :func:`lightning_peft.layout.find_blocks` returns.
- ``adapter_parameter_names(model) -> list[str]``: their parameter names.
- Every :class:`Adapter` has ``down`` and ``up`` ``nn.Linear`` projections (``up`` is zero at initialisation, so
  the model starts as it was) and a float ``scale`` attribute multiplying its output; its ``forward(x)`` returns
  only the correction, which the block adds to the sublayer's output.
- ``mark_only_adapters_as_trainable(model, modules_to_save=())``: freeze everything else (``add_adapters`` does
  it by default, as ``peft.get_peft_model`` does).
"""

from lightning_peft.adapters.bottleneck import Adapter, BottleneckAdapter, ConformerAdapter
from lightning_peft.adapters.config import ADAPTER_PEFT_TYPES, AdapterConfig
from lightning_peft.adapters.model import (
    adapter_modules,
    adapter_parameter_names,
    adapters_per_block,
    add_adapters,
    mark_only_adapters_as_trainable,
)

__all__ = [
    "ADAPTER_PEFT_TYPES",
    "Adapter",
    "AdapterConfig",
    "BottleneckAdapter",
    "ConformerAdapter",
    "adapter_modules",
    "adapter_parameter_names",
    "adapters_per_block",
    "add_adapters",
    "mark_only_adapters_as_trainable",
]
