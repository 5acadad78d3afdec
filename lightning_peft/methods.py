"""The methods registry: every method describes itself once, and every tool iterates the registry.

A :class:`Method` holds what the tools need to know about one method: its name (the key the estimate, the support
check, the CLI and the benchmarks use), its label (how tables print it), its callback and that callback's defaults,
:meth:`Method.preview` (the parameters it would train, asked of the callback itself, without a Trainer), its
support probe, and what the memory estimate does with it. :func:`lightning_peft.estimate.estimate_memory`,
:func:`lightning_peft.support.check_support`, ``lightning-peft estimate --methods`` and the benchmarks read the
registry, so a method registered with :func:`register_method` -- in the user's own file -- appears in all of them
(peft's ``register_peft_method`` is the model).

Built in, in this order: ``full`` (full fine-tuning), ``lora`` (HF peft LoRA on every Linear of the blocks),
``lisa``, ``hft`` (Half Fine-Tuning), ``ist``, ``early_pruning``, ``activation_quantization`` (8-bit
activations), ``optimizer_in_backward`` (the optimizer step in backward), ``gradual_unfreezing`` and ``llrd``
(layer-wise learning-rate decay).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_peft.callbacks import (
    IST,
    LISA,
    ActivationQuantization,
    EarlyPruning,
    GradualUnfreezing,
    HalfFineTuning,
    LayerwiseLRDecay,
    OptimizerInBackward,
)
from lightning_peft.layout import find_blocks
from lightning_peft.quantization.saved_tensors import DEFAULT_MIN_NUMEL

__all__ = ["Method", "get_method", "method_of", "methods", "register_method", "unregister_method"]

#: The probe's answer: ``("ok" | "partial" | "fail", detail)``; a ``ValueError`` with a ``HINT`` is a refusal.
ProbeResult = tuple[str, str]
Probe = Callable[
    [Callable[[], nn.Module], Mapping[str, torch.Tensor], Callable[[Any], torch.Tensor], bool], ProbeResult
]
_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True, eq=False)
class Method:
    """One fine-tuning method, as every tool of the package sees it.

    Args:
        name: the key of the method everywhere (``estimate --methods lisa``, an estimate row ``"lisa+int8_act"``, a
            support-matrix column): lower case letters, digits and ``_``.
        label: how tables print it (``"Half FT"``).
        callback: the Lightning callback that runs it; ``None`` for methods that are a way of building the model
            (full fine-tuning, LoRA).
        defaults: the arguments the tools build the callback with (and the settings of ``trains`` / ``prepare``);
            :meth:`configure` changes them.
        trains: ``trains(model, settings)`` returns the names of the parameters that would train. Default: ask the
            callback, ``callback(**settings).preview(model)`` (a set of names, or an object with a ``trainable``
            set, as :meth:`LISA.preview <lightning_peft.callbacks.LISA.preview>` and
            :meth:`HalfFineTuning.preview <lightning_peft.callbacks.HalfFineTuning.preview>` return).
        prepare: ``prepare(model, settings)`` changes the model before training (LoRA puts its adapters in);
            ``trains`` then answers for the changed model.
        probe: ``probe(build, inputs, output, causal_lm)`` checks what the method promises on a fresh model from
            ``build`` and returns ``(status, detail)`` (see :mod:`lightning_peft.support`). Default for a method with
            a callback that trains a subset: one step with the callback, every parameter that got a gradient must be
            in :meth:`preview`'s set.
        estimate: what :func:`~lightning_peft.estimate.estimate_memory` does with the method: ``"trainable"``, a
            row per method with the parameters of :meth:`preview` trainable; ``"activations"``, the ``int8_act``
            variants with its ``group_size`` and ``min_numel``; ``"in_backward"``, the ``in_backward`` variants
            (gradient memory of the optimizer step in backward; for a config, offered where the callback's
            ``setup`` accepts the config's Trainer); ``None``, not estimated (early pruning changes the model's
            shape while it trains, IST needs PEFT modules the model builds).
        settings_of: reads the settings back from a configured callback (default: the callback's attributes of the
            same names as its arguments); :func:`~lightning_peft.cli.estimate.estimate_from_config` uses it.
        builtin: registered by this package (the benchmarks measure the built-in methods with their own settings,
            and every other registered method with its defaults).
        choices: settings the memory estimate shows beside the method's own, each as a row of its own:
            ``{suffix: (label, settings)}``; the row's method is ``f"{name}_{suffix}"`` (LISA's
            ``lisa_embeddings_frozen``). :meth:`alternatives` builds them.

    Raises:
        ValueError: for a name that is not lower case letters, digits and ``_``, or an ``estimate`` other than
            ``"trainable"``, ``"activations"`` or ``None``.

    Example::

        >>> from lightning_peft.methods import get_method
        >>> lisa = get_method("lisa").configure(n_layers=1, seed=0)
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ModuleList(nn.Linear(4, 4) for _ in range(4)))
        >>> sorted(get_method("lisa").configure(n_layers=1, seed=0, layers="1").preview(net))
        ['0.bias', '0.weight', '1.0.bias', '1.0.weight']
        >>> lisa.label, type(lisa.build_callback()).__name__, lisa.settings["n_layers"]
        ('LISA', 'LISA', 1)
    """

    name: str
    label: str
    callback: type[Callback] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    trains: Callable[[nn.Module, Mapping[str, Any]], Collection[str]] | None = None
    prepare: Callable[[nn.Module, Mapping[str, Any]], None] | None = None
    probe: Probe | None = None
    estimate: Literal["trainable", "activations", "in_backward"] | None = "trainable"
    settings_of: Callable[[Callback], Mapping[str, Any]] | None = None
    builtin: bool = False
    choices: Mapping[str, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name) or self.name == "configured":
            raise ValueError(
                f"`name` must be lower case letters, digits and '_' (starting with a letter, not 'configured'), got"
                f" {self.name!r}. HINT: e.g. 'freeze_biases'; the label can be any text."
            )
        if self.estimate not in ("trainable", "activations", "in_backward", None):
            raise ValueError(
                f"`estimate` must be 'trainable', 'activations', 'in_backward' or None, got {self.estimate!r}."
                " HINT: 'trainable' for a method that chooses what trains."
            )
        object.__setattr__(self, "defaults", dict(self.defaults))

    # ------------------------------------------------------------------------------------------------ settings

    @property
    def settings(self) -> dict[str, Any]:
        """The arguments the tools build the callback with (a copy of ``defaults``)."""
        return dict(self.defaults)

    def _arguments(self) -> set[str]:
        if self.callback is None:
            return set(self.defaults)
        names = inspect.signature(self.callback.__init__).parameters
        return set(self.defaults) | {n for n in names if n not in ("self", "args", "kwargs")}

    def configure(self, **settings: Any) -> Method:
        """This method with some settings changed (the registry's entry stays as it is).

        Raises:
            ValueError: for a setting the method does not take.

        Example::

            >>> get_method("lora").configure(r=8).settings
            {'r': 8, 'alpha': 32}
        """
        allowed = self._arguments()
        unknown = sorted(set(settings) - allowed)
        if unknown:
            raise ValueError(
                f"`{unknown[0]}` is not a setting of the method {self.name!r}; it takes {', '.join(sorted(allowed))}."
                f" HINT: check the spelling against {self.callback.__name__ if self.callback else 'its defaults'}."
            )
        return replace(self, defaults={**self.defaults, **settings})

    def alternatives(self) -> list[Method]:
        """The method under each of its :attr:`choices` that differs from its present settings.

        Each is named ``f"{name}_{suffix}"``, labelled with the choice's label and has no choices of its own.

        Example::

            >>> [(m.name, m.label) for m in get_method("lisa").alternatives()]  # doctest: +NORMALIZE_WHITESPACE
            [('lisa_embeddings_frozen', 'LISA, embeddings frozen'),
             ('lisa_embeddings_head_frozen', 'LISA, embeddings and head frozen')]
        """
        found = []
        for suffix, (label, settings) in self.choices.items():
            if all(self.defaults.get(key) == value for key, value in settings.items()):
                continue
            configured = self.configure(**settings)
            found.append(replace(configured, name=f"{self.name}_{suffix}", label=label, choices={}))
        return found

    def from_callback(self, callback: Callback) -> Method:
        """This method with the settings of ``callback``, a configured instance of its callback class."""
        if self.settings_of is not None:
            return replace(self, defaults={**self.defaults, **self.settings_of(callback)})
        settings = {n: getattr(callback, n) for n in self._arguments() if hasattr(callback, n)}
        return replace(self, defaults={**self.defaults, **settings})

    def build_callback(self, **overrides: Any) -> Callback | None:
        """The method's callback with its settings (and ``overrides``); ``None`` for a method without one.

        Example::

            >>> get_method("lisa").build_callback(interval=5).interval
            5
        """
        if self.callback is None:
            return None
        return self.callback(**{**self.defaults, **overrides})

    # ------------------------------------------------------------------------------------------------ what trains

    def preview(self, model: nn.Module) -> frozenset[str]:
        """The names of the parameters of ``model`` that the method would train first, without a Trainer.

        For a method with ``prepare`` (LoRA), ``model`` is the model as ``prepare`` leaves it.

        Raises:
            TypeError: if the method can tell neither through ``trains`` nor through its callback's ``preview``.
            ValueError: if the method refuses the model (as its callback would at setup).
        """
        if self.trains is not None:
            return frozenset(self.trains(model, self.settings))
        callback = self.build_callback()
        preview = getattr(callback, "preview", None)
        if not callable(preview):
            raise TypeError(
                f"the method {self.name!r} cannot tell what it trains: it has no `trains` and its callback"
                f" {type(callback).__name__ if callback is not None else None} has no `preview(model)`. HINT: give"
                " the callback a `preview(model)` returning the names of the parameters it would train, or pass"
                " `trains=` to Method."
            )
        answer = preview(model)
        return frozenset(getattr(answer, "trainable", answer))

    def apply(self, model: nn.Module) -> nn.Module:
        """Make ``model`` what the method trains: ``prepare`` it, then only :meth:`preview`'s parameters train.

        The memory estimate calls it on the model built on the ``meta`` device.

        Example::

            >>> net = nn.Sequential(nn.Linear(4, 4), nn.ModuleList(nn.Linear(4, 4) for _ in range(4)))
            >>> trained = get_method("lisa").configure(n_layers=2, layers="1").apply(net)
            >>> sum(p.requires_grad for p in trained.parameters())
            6
        """
        if self.prepare is not None:
            self.prepare(model, self.settings)
        trainable = self.preview(model)
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)
        return model

    @property
    def supported(self) -> bool:
        """Whether the support check has something to check: a probe, or a callback whose set can be previewed."""
        return self.probe is not None or (self.callback is not None and self.estimate == "trainable")

    def check(
        self,
        build: Callable[[], nn.Module],
        inputs: Mapping[str, torch.Tensor],
        output: Callable[[Any], torch.Tensor],
        causal_lm: bool = False,
    ) -> ProbeResult:
        """Run the method's support probe on a model from ``build`` (see :mod:`lightning_peft.support`)."""
        if self.probe is not None:
            return self.probe(build, inputs, output, causal_lm)
        from lightning_peft.support import check_trainable_set

        return check_trainable_set(self, build, inputs, output)


# ---------------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, replace: bool = False) -> Method:
    """Add ``method`` to the registry, so the estimate, the support check, the CLI and the benchmarks know it.

    Args:
        method: the :class:`Method`.
        replace: allow replacing a method of the same name.

    Returns:
        ``method``.

    Raises:
        ValueError: if a method of that name is registered and ``replace`` is False.

    Example::

        >>> from lightning_peft.methods import Method, register_method, unregister_method
        >>> heads = lambda model, settings: {n for n, _ in model.named_parameters() if n.startswith("head")}
        >>> _ = register_method(Method("head_only", "Head only", trains=heads))
        >>> "head_only" in [m.name for m in methods()]
        True
        >>> unregister_method("head_only")
    """
    if not isinstance(method, Method):
        raise TypeError(
            f"`method` must be a lightning_peft.methods.Method, got {type(method).__name__}."
            " HINT: register_method(Method(name=..., label=..., callback=...))."
        )
    if method.name in _REGISTRY and not replace:
        raise ValueError(
            f"`method` {method.name!r} is already registered ({_REGISTRY[method.name].label})."
            " HINT: choose another name, or pass replace=True to replace it."
        )
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove the method ``name`` from the registry (a test's or a notebook's clean-up).

    Raises:
        KeyError: if no method of that name is registered.
    """
    get_method(name)
    del _REGISTRY[name]


def get_method(name: str | Method) -> Method:
    """The registered method ``name`` (a :class:`Method` is returned as it is).

    Raises:
        KeyError: for a name that is not registered.

    Example::

        >>> get_method("hft").label
        'Half FT'
    """
    if isinstance(name, Method):
        return name
    if name not in _REGISTRY:
        raise KeyError(
            f"`method` must be one of {', '.join(_REGISTRY)}, got {name!r}. HINT: register your own with"
            " lightning_peft.methods.register_method."
        )
    return _REGISTRY[name]


def methods() -> tuple[Method, ...]:
    """Every registered method, the built-in ones first, in the order they were registered.

    Example::

        >>> [m.name for m in methods()][:4]
        ['full', 'lora', 'lisa', 'hft']
    """
    return tuple(_REGISTRY.values())


def method_of(callback: Callback) -> Method | None:
    """The registered method whose callback class ``callback`` is an instance of (None if none is).

    Example::

        >>> method_of(LISA()).name
        'lisa'
    """
    for method in _REGISTRY.values():
        if method.callback is not None and isinstance(callback, method.callback):
            return method
    return None


# ---------------------------------------------------------------------------------------------------- built-in


def _all_parameters(model: nn.Module, settings: Mapping[str, Any]) -> set[str]:
    return {name for name, _ in model.named_parameters()}


def _inject_lora(model: nn.Module, settings: Mapping[str, Any]) -> None:
    """LoRA of rank ``r`` (alpha ``alpha``) on every Linear of the blocks."""
    from peft import LoraConfig, inject_adapter_in_model

    stack = find_blocks(model)
    targets = []
    for block_name in stack.names:
        block = model.get_submodule(block_name)
        targets += [f"{block_name}.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    if not targets:
        raise ValueError("no nn.Linear inside the blocks to put LoRA on. HINT: use LISA or Half Fine-Tuning.")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], target_modules=targets)
    with device:
        inject_adapter_in_model(config, model)


def _lora_trains(model: nn.Module, settings: Mapping[str, Any]) -> set[str]:
    """LoRA's trainable set: the adapters, and the parameters outside the blocks that are neither embeddings nor norms.

    A classifier head trains, as peft's ``modules_to_save`` would keep it trainable.
    """
    outside = set(find_blocks(model).outside_parameter_names())
    embeddings = {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding)
        for p, _ in m.named_parameters()
    }
    heads = {n for n in outside if n not in embeddings and not re.search(r"(embed|wte|wpe|lm_head|norm)", n)}
    return {name for name, _ in model.named_parameters() if "lora_" in name or name in heads}


def _lisa_trains(model: nn.Module, settings: Mapping[str, Any]) -> set[str]:
    """LISA's set in the period of its largest memory: ``"sampled"`` embeddings / head as if drawn (``"always"``).

    They are drawn from a stream of their own, so the blocks are those of the previewed period either way; a period
    that draws them needs what ``"always"`` needs, and that period is the peak the memory estimate is for.
    """
    peak = {**settings, **{k: "always" for k in ("embeddings", "head") if settings.get(k) == "sampled"}}
    return set(LISA(**peak).preview(model).trainable)


def _support_probe(name: str) -> Probe:
    """The probe ``lightning_peft.support.<name>``, imported when it runs (support imports this module)."""

    def probe(build, inputs, output, causal_lm: bool = False) -> ProbeResult:
        from lightning_peft import support

        return getattr(support, name)(build, inputs, output, causal_lm)

    probe.__name__ = name
    return probe


def _activation_settings(callback: Callback) -> dict[str, Any]:
    quantizer = callback.quantizer
    return {"format": quantizer.format, "group_size": quantizer.group_size, "min_numel": quantizer.min_numel}


for _method in (
    Method("full", "Full FT", trains=_all_parameters, builtin=True),
    Method("lora", "LoRA", defaults={"r": 16, "alpha": 32}, trains=_lora_trains, prepare=_inject_lora, builtin=True),
    Method(
        "lisa",
        "LISA",
        callback=LISA,
        # the paper's settings; `embeddings` / `head` ("always", "sampled", "frozen") change what trains outside the
        # blocks, and `preview` (LISAPlan: `embeddings`, `head`, `*_trained`, `no_grad_blocks`) says what they do
        defaults={"n_layers": 2, "interval": 20, "embeddings": "always", "head": "always"},
        trains=_lisa_trains,
        probe=_support_probe("check_lisa"),
        builtin=True,
        choices={
            "embeddings_frozen": ("LISA, embeddings frozen", {"embeddings": "frozen"}),
            "embeddings_head_frozen": ("LISA, embeddings and head frozen", {"embeddings": "frozen", "head": "frozen"}),
        },
    ),
    Method("hft", "Half FT", callback=HalfFineTuning, probe=_support_probe("check_hft"), builtin=True),
    Method(
        "ist",
        "IST",
        callback=IST,
        defaults={"update_ratio": 0.25, "interval": 10},
        probe=_support_probe("check_ist"),
        estimate=None,
        builtin=True,
    ),
    Method(
        "early_pruning",
        "Early pruning",
        callback=EarlyPruning,
        probe=_support_probe("check_pruning"),
        estimate=None,
        builtin=True,
    ),
    Method(
        "activation_quantization",
        "8-bit activations",
        callback=ActivationQuantization,
        defaults={"format": "int8", "group_size": 128, "min_numel": DEFAULT_MIN_NUMEL},
        probe=_support_probe("check_quantization"),
        estimate="activations",
        settings_of=_activation_settings,
        builtin=True,
    ),
    Method(
        "optimizer_in_backward",
        "optimizer step in backward",
        callback=OptimizerInBackward,
        estimate="in_backward",
        builtin=True,
    ),
    # no benchmark table names these two: the benchmarks run them with these defaults, as any method they do not name
    Method(
        "gradual_unfreezing",
        "Gradual unfreezing",
        callback=GradualUnfreezing,
        defaults={"unfreeze_every": 20, "unit": "steps"},
        probe=_support_probe("check_gradual_unfreezing"),
    ),
    Method(
        "llrd",
        "Layer-wise LR decay",
        callback=LayerwiseLRDecay,
        defaults={"decay": 0.75},
        probe=_support_probe("check_llrd"),
        estimate=None,  # it trains what full fine-tuning trains: the memory of the `full` row
    ),
):
    register_method(_method)
del _method
