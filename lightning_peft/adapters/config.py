"""The adapter configuration: a dataclass that reads like a peft config and can be written in YAML."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lightning_peft.adapters.layers import ACTIVATIONS

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
        if self.peft_type not in ADAPTER_PEFT_TYPES:
            raise ValueError(
                f"`peft_type` must be one of {list(ADAPTER_PEFT_TYPES)}, got {self.peft_type!r}."
                " HINT: BOTTLENECK for Pfeiffer / Houlsby adapters, CONFORMER for PETL-AST's conformer adapter."
            )
        if self.layout not in _LAYOUTS:
            raise ValueError(
                f"`layout` must be one of {sorted(_LAYOUTS)}, got {self.layout!r}."
                " HINT: 'pfeiffer' puts one adapter after the MLP, 'houlsby' one after attention and one after the MLP."
            )
        if self.placement not in _PLACEMENTS:
            raise ValueError(
                f"`placement` must be one of {list(_PLACEMENTS)}, got {self.placement!r}."
                " HINT: 'sequential' adapts the sublayer's output, 'parallel' runs beside the sublayer on its input."
            )
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ValueError(
                f"`reduction_factor` must be an integer >= 1, got {self.reduction_factor!r}. HINT: the papers use 16."
            )
        if self.bottleneck_size is not None and (not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1):
            raise ValueError(
                f"`bottleneck_size` must be None or an integer >= 1, got {self.bottleneck_size!r}."
                " HINT: leave it None to use `reduction_factor`."
            )
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(
                f"`activation` must be None or one of {sorted(ACTIVATIONS)}, got {self.activation!r}."
                " HINT: None picks the paper's choice."
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}. HINT: adapters usually use 0.")
        if self.norm not in ("batch", "layer"):
            raise ValueError(f"`norm` must be 'batch' or 'layer', got {self.norm!r}. HINT: Conformer uses 'batch'.")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1:
            raise ValueError(f"`kernel_size` must be an integer >= 1, got {self.kernel_size!r}. HINT: Conformer: 31.")
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
