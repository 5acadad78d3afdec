"""The adapter configuration: a dataclass that reads like a peft config and can be written in YAML."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lightning_peft._validation import check_choice, check_int, check_number
from lightning_peft.adapters.bottleneck import ACTIVATIONS

__all__ = ["ADAPTER_PEFT_TYPES", "AdapterConfig"]

ADAPTER_PEFT_TYPES = ("BOTTLENECK", "CONFORMER")
_LAYOUTS = {"pfeiffer": ("mlp",), "houlsby": ("attention", "mlp")}
_PLACEMENTS = ("sequential", "parallel")
# Paper defaults of the activation (AdapterHub's Pfeiffer / Houlsby configs; Conformer's swish).
_DEFAULT_ACTIVATION = {("BOTTLENECK", "pfeiffer"): "relu", ("BOTTLENECK", "houlsby"): "silu"}


@dataclass
class AdapterConfig:
    """Where and which adapters :func:`~lightning_peft.adapters.add_adapters` inserts into every block.

    Args:
        peft_type: ``"BOTTLENECK"`` (:class:`~lightning_peft.adapters.BottleneckAdapter`) or ``"CONFORMER"``
            (:class:`~lightning_peft.adapters.ConformerAdapter`, the conformer adapter of PETL-AST).
        layout: ``"pfeiffer"``: one adapter after the MLP sublayer of each block; ``"houlsby"``: one after the
            attention sublayer and one after the MLP sublayer.
        placement: ``"sequential"``: the adapter reads the sublayer's output and its correction is added to it
            (``y = f(x); y + a(y)``); ``"parallel"``: it reads the sublayer's input (``f(x) + a(x)``, He et al. 2022).
        reduction_factor: bottleneck width = hidden width // ``reduction_factor`` (16 in both papers).
        bottleneck_size: bottleneck width, overriding ``reduction_factor``.
        activation: ``relu``, ``gelu``, ``silu`` (= ``swish``) or ``tanh``. ``None``: the paper's choice (Pfeiffer:
            relu; Houlsby and conformer: swish).
        dropout: dropout inside the adapter.
        scale: factor on each adapter's output (each adapter keeps its own ``scale`` attribute).
        kernel_size: kernel of the conformer adapter's depthwise convolution over tokens.
        norm: normalisation of the conformer adapter, ``"batch"`` or ``"layer"``.
        layers: dotted path of the block container, or a list of paths (one per stack), when the automatic search
            is wrong.
        sites: where a sublayer starts and ends inside a block, for layouts the registry does not know:
            ``{"attention": ["attn.qkv", "attn.proj"], "mlp": ["mlp.fc1", "mlp.fc2"]}`` (entry module, whose input
            is the sublayer's input, and output projection; paths relative to the block). By default both come from
            the layout registry (:mod:`lightning_peft.layout`): the first projection and the output projection of
            the block's self-attention and of its MLP. Declaring the block's layout once with
            :func:`~lightning_peft.layout.register_layout` serves every method; ``sites`` serves the adapters only.
        modules_to_save: names (or name suffixes) of modules that train fully besides the adapters, e.g. the head.
        task_type: as in peft; ``"SEQ_CLS"`` without ``modules_to_save`` keeps an HF ``classifier`` / ``score``
            head trainable.

    Raises:
        ValueError: if a value is outside the allowed ones (the message names the argument and the choices).

    Example::

        >>> from lightning_peft.adapters import AdapterConfig
        >>> AdapterConfig(layout="houlsby", placement="parallel", reduction_factor=8).locations
        ('attention', 'mlp')

    In YAML, as the ``peft`` argument of the ready modules::

        peft: {peft_type: BOTTLENECK, layout: houlsby, placement: parallel, reduction_factor: 8}
    """

    peft_type: str = "BOTTLENECK"
    layout: str = "pfeiffer"
    placement: str = "sequential"
    reduction_factor: int = 16
    bottleneck_size: int | None = None
    activation: str | None = None
    dropout: float = 0.0
    scale: float = 1.0
    kernel_size: int = 31
    norm: str = "batch"
    layers: str | list[str] | None = None
    sites: dict[str, list[str]] | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self.peft_type = str(self.peft_type).upper()
        self.layout = str(self.layout).lower()
        self.placement = str(self.placement).lower()
        check_choice(
            "peft_type",
            self.peft_type,
            list(ADAPTER_PEFT_TYPES),
            "BOTTLENECK for Pfeiffer / Houlsby adapters, CONFORMER for PETL-AST's conformer adapter.",
        )
        check_choice(
            "layout",
            self.layout,
            sorted(_LAYOUTS),
            "'pfeiffer' puts one adapter after the MLP, 'houlsby' one after attention and one after the MLP.",
        )
        check_choice(
            "placement",
            self.placement,
            list(_PLACEMENTS),
            "'sequential' adapts the sublayer's output, 'parallel' runs beside the sublayer on its input.",
        )
        check_int("reduction_factor", self.reduction_factor, 1, "the papers use 16.")
        hint = "leave it None to use `reduction_factor`."
        check_int("bottleneck_size", self.bottleneck_size, 1, hint, allow_none=True)
        if self.activation is not None:
            check_choice("activation", self.activation, sorted(ACTIVATIONS), "None picks the paper's choice.")
        self.dropout = check_number(
            "dropout", self.dropout, 0, 1, "adapters usually use 0.", "a number in [0, 1)", include_low=True
        )
        hint = "1.0 adds the adapter's output as it is."
        self.scale = check_number("scale", self.scale, -math.inf, math.inf, hint, "a number")
        check_choice("norm", self.norm, ["batch", "layer"], "Conformer uses 'batch'.")
        check_int("kernel_size", self.kernel_size, 1, "Conformer: 31.")
        if self.sites is not None:
            for location, pair in self.sites.items():
                if location not in ("attention", "mlp") or len(pair) != 2:
                    raise ValueError(
                        f"`sites` must map 'attention' / 'mlp' to [entry module, output projection], got"
                        f" {location!r}: {pair!r}. HINT: e.g. {{'mlp': ['mlp', 'mlp.fc2']}}, paths relative to a block."
                    )
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]

    @property
    def locations(self) -> tuple[str, ...]:
        """The sublayers that get an adapter: ``("mlp",)`` or ``("attention", "mlp")``."""
        return _LAYOUTS[self.layout]

    @property
    def resolved_activation(self) -> str:
        """The activation used: ``activation``, or the paper's default for this type and layout."""
        return self.activation or _DEFAULT_ACTIVATION.get((self.peft_type, self.layout), "silu")

    def bottleneck_for(self, dim: int) -> int:
        """Bottleneck width for hidden width ``dim``."""
        return self.bottleneck_size if self.bottleneck_size is not None else max(1, dim // self.reduction_factor)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what a YAML ``peft:`` entry holds)."""
        return asdict(self)
