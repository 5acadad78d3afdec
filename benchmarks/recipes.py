"""What one benchmarked run trains, for every benchmark: a method of the registry and what it is combined with.

Each benchmark keeps one table of :class:`Recipe` rows (its row key -> recipe). A recipe names the registry's method
(:mod:`lightning_peft.methods`) that chooses what trains and the settings it runs with here; the callbacks come from
the registry (``get_method(name).configure(**settings).build_callback()``), the rest of the run from the recipe's
fields (activation format, optimizer, checkpointing, ...), so no benchmark decides anything by comparing names.
:func:`with_registered` adds a row for every method registered beyond the built-in ones, measured with its
defaults: a method added in its own file appears in the benchmarks too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_peft.methods import Method, get_method, methods


@dataclass(frozen=True)
class Recipe:
    """One benchmarked run.

    Attributes:
        label: the row's label in the results (the method and the settings that matter here).
        method: the name of the registry's method that chooses what trains (``"full"``: everything).
        settings: the method's arguments in this benchmark (over the registry's defaults), or a function of the
            run's context (``schedule=...``, ``seed=...``) that returns them.
        peft: the model is wrapped in the benchmark's own LoRA configuration (``peft.get_peft_model``).
        activations: the :class:`~lightning_peft.callbacks.ActivationQuantization` format, if any.
        optimizer: the optimizer (:data:`benchmarks.peers.OPTIMIZERS`).
        checkpointing: activation checkpointing of every block (:func:`benchmarks.peers.enable_checkpointing`).
        offload: tensors saved for backward kept in CPU memory (``MeasuringCallback(offload=True)``).
        unquantized: the row key of the same run without activation quantization.
        cover_blocks: run until every block was sampled once before timing (LISA with its state kept).
        estimated: the memory estimate models this run (``benchmarks.estimate_check``).
    """

    label: str
    method: str = "full"
    settings: Mapping[str, Any] | Callable[..., Mapping[str, Any]] = field(default_factory=dict)
    peft: bool = False
    activations: str | None = None
    optimizer: str = "adamw"
    checkpointing: bool = False
    offload: bool = False
    unquantized: str | None = None
    cover_blocks: bool = False
    estimated: bool = True

    def entry(self, **context: Any) -> Method:
        """The registry's method with this recipe's settings (``context`` is passed to a settings function)."""
        settings = self.settings(**context) if callable(self.settings) else self.settings
        return get_method(self.method).configure(**settings)

    def callbacks(self, **context: Any) -> list[Callback]:
        """The registry method's callback with this recipe's settings; none for a method without a callback."""
        callback = self.entry(**context).build_callback()
        return [] if callback is None else [callback]

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` as the run trains it: a registered method without a callback (it freezes through ``trains``)
        applied; the built-in ones (full fine-tuning; LoRA, which the benchmark builds with its own configuration)
        and the methods with a callback leave it as built.
        """
        method = get_method(self.method)
        if method.callback is None and not method.builtin and not self.peft:
            return self.entry().apply(model)
        return model

    def estimator_row(self) -> str | None:
        """The memory estimate's row of this run (``"lisa+int8_act+adamw8bit"``), or None where it models none.

        Any activation format maps to ``int8_act``: FP8 stores as many bytes as int8.
        """
        if not self.estimated or self.offload or self.optimizer not in ("adamw", "adamw8bit"):
            return None
        variants = [v for v, on in (("int8_act", self.activations), ("adamw8bit", self.optimizer == "adamw8bit"),
                                    ("checkpointing", self.checkpointing)) if on]  # fmt: skip
        return "+".join([self.method, *variants])


def registered(trains_subset_only: bool = True) -> dict[str, Recipe]:
    """A recipe (the method's label and defaults) for every method registered beyond the built-in ones.

    ``trains_subset_only``: only methods the estimator makes rows for (they choose what trains, so a plain run of
    the benchmark's model shows them), as every benchmark here measures.
    """
    return {
        m.name: Recipe(m.label, m.name)
        for m in methods()
        if not m.builtin and (m.estimate == "trainable" or not trains_subset_only)
    }


def with_registered(table: Mapping[str, Recipe]) -> dict[str, Recipe]:
    """``table`` and, after it, a recipe for every registered method it does not have (:func:`registered`)."""
    return {**table, **{k: r for k, r in registered().items() if k not in table}}
