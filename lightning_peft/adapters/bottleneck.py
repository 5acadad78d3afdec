"""The adapter modules: a bottleneck MLP and the conformer adapter of PETL-AST.

Both map a ``(..., dim)`` tensor to a correction of the same shape, ``scale * up(...(down(x)))``. Only the output
projection ``up`` starts at zero, so an inserted adapter leaves the network's function unchanged at
initialisation, while ``down`` keeps its random initialisation: after the first update of ``up`` every adapter
parameter receives gradients (zero-initialising both projections would keep them at zero forever).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "Adapter", "BottleneckAdapter", "ConformerAdapter"]

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"`activation` must be one of {sorted(ACTIVATIONS)}, got {name!r}."
            " HINT: the Pfeiffer adapter uses 'relu', the Houlsby and conformer adapters 'silu' (swish)."
        )
    return ACTIVATIONS[name]()


class Adapter(nn.Module):
    """Base class of the adapters: a ``down`` and an ``up`` projection and a float ``scale`` on the output.

    ``scale`` is a plain attribute (not a parameter): methods such as IST multiply it to suppress an adapter
    temporarily and write the original value back.

    Example::

        >>> adapter = BottleneckAdapter(dim=8, bottleneck=2)
        >>> isinstance(adapter, Adapter), adapter.scale
        (True, 1.0)
    """

    down: nn.Linear
    up: nn.Linear

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = float(scale)

    def reset_output(self) -> None:
        """Set the output projection to zero, so the adapter adds nothing (its state at creation)."""
        nn.init.zeros_(self.up.weight)
        if self.up.bias is not None:
            nn.init.zeros_(self.up.bias)

    def extra_repr(self) -> str:
        """Show the scale in the module's repr."""
        return f"scale={self.scale}"


class BottleneckAdapter(Adapter):
    """Bottleneck adapter (Houlsby et al. 2019; Pfeiffer et al. 2021): ``scale * up(dropout(act(down(x))))``.

    Papers: Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", https://arxiv.org/abs/1902.00751;
    Pfeiffer et al., "AdapterFusion", https://arxiv.org/abs/2005.00247.

    Where it sits (after the attention and/or MLP sublayer, sequential or parallel) is decided by
    :func:`lightning_peft.adapters.add_adapters`; the residual connection around it is added there.

    Args:
        dim: width of the hidden states.
        bottleneck: width of the bottleneck.
        activation: ``relu``, ``gelu``, ``silu`` (= ``swish``) or ``tanh``.
        dropout: dropout on the bottleneck activations.
        scale: factor on the output.

    Example::

        >>> import torch
        >>> adapter = BottleneckAdapter(dim=16, bottleneck=4)
        >>> adapter(torch.randn(2, 5, 16)).abs().max().item()  # zero output projection: adds nothing at first
        0.0
    """

    def __init__(
        self, dim: int, bottleneck: int, activation: str = "relu", dropout: float = 0.0, scale: float = 1.0
    ) -> None:
        super().__init__(scale)
        self.down = nn.Linear(dim, bottleneck)
        self.act = _activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.reset_output()

    def forward(self, x: Tensor) -> Tensor:
        """Return the correction ``scale * up(dropout(act(down(x))))``."""
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale


class ConformerAdapter(Adapter):
    """The conformer adapter of PETL-AST: a Conformer convolution module used as a bottleneck.

    Paper: Cappellazzo et al. 2024, "Parameter-Efficient Transfer Learning of Audio Spectrogram Transformers",
    https://arxiv.org/abs/2312.03694 (the convolution module of Gulati et al. 2020, https://arxiv.org/abs/2005.08100).

    Pointwise convolution to ``2 * bottleneck`` channels (``down``), GLU (back to ``bottleneck``), depthwise
    convolution over the token axis, normalisation, activation, pointwise convolution back to ``dim`` (``up``, zero at
    initialisation). Pointwise convolutions are ``nn.Linear`` layers over the channel axis (the same operation), so
    every adapter has ``down`` / ``up`` Linear layers. Inputs are ``(batch, tokens, dim)``; any leading dimensions are
    flattened into the batch.

    Args:
        dim: width of the hidden states.
        bottleneck: number of channels of the depthwise convolution.
        kernel_size: kernel of the depthwise convolution over tokens (Conformer uses 31; "same" padding).
        norm: ``"batch"`` (BatchNorm over channels, as in Conformer) or ``"layer"`` (LayerNorm, independent of the
            batch and of padding tokens).
        activation: activation after the normalisation (Conformer: ``silu`` = swish).
        dropout: dropout before the output projection.
        scale: factor on the output.

    Example::

        >>> import torch
        >>> adapter = ConformerAdapter(dim=16, bottleneck=4, kernel_size=3)
        >>> adapter(torch.randn(2, 7, 16)).shape
        torch.Size([2, 7, 16])
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        kernel_size: int = 31,
        norm: str = "batch",
        activation: str = "silu",
        dropout: float = 0.0,
        scale: float = 1.0,
    ) -> None:
        super().__init__(scale)
        if norm not in ("batch", "layer"):
            raise ValueError(f"`norm` must be 'batch' or 'layer', got {norm!r}. HINT: Conformer uses 'batch'.")
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"`kernel_size` must be an integer >= 1, got {kernel_size!r}. HINT: Conformer uses 31.")
        self.down = nn.Linear(dim, 2 * bottleneck)
        self.glu = nn.GLU(dim=-1)
        self.depthwise = nn.Conv1d(bottleneck, bottleneck, kernel_size, padding="same", groups=bottleneck)
        self.norm = nn.BatchNorm1d(bottleneck) if norm == "batch" else nn.LayerNorm(bottleneck)
        self.act = _activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.reset_output()

    def forward(self, x: Tensor) -> Tensor:
        """Return the correction for ``x`` of shape ``(..., tokens, dim)``."""
        shape = x.shape
        h = self.glu(self.down(x.reshape(-1, shape[-2], shape[-1]) if x.dim() != 3 else x))  # (B, T, b)
        h = self.depthwise(h.transpose(1, 2))  # (B, b, T)
        if isinstance(self.norm, nn.BatchNorm1d):
            h = self.norm(h).transpose(1, 2)
        else:
            h = self.norm(h.transpose(1, 2))
        out = self.up(self.dropout(self.act(h))) * self.scale
        return out.reshape(shape) if x.dim() != 3 else out


def _check_dims(dim: int, bottleneck: int) -> None:
    if bottleneck < 1 or bottleneck > dim:
        raise ValueError(
            f"the adapter bottleneck must be between 1 and the hidden width {dim}, got {bottleneck}."
            " HINT: set `reduction_factor` (bottleneck = width // reduction_factor) or `bottleneck_size`."
        )


def build_adapter(kind: str, dim: int, bottleneck: int, **kwargs) -> Adapter:
    """Create a ``"BOTTLENECK"`` or ``"CONFORMER"`` adapter of width ``dim``."""
    _check_dims(dim, bottleneck)
    if kind == "BOTTLENECK":
        kwargs.pop("kernel_size", None)
        kwargs.pop("norm", None)
        return BottleneckAdapter(dim, bottleneck, **kwargs)
    return ConformerAdapter(dim, bottleneck, **kwargs)
