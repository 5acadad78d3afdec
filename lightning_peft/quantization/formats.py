"""8-bit storage formats for tensors: ``int8`` and FP8 (E4M3 / E5M2), each with one scale per group.

A tensor is read as a flat sequence in its memory order and cut into groups of ``group_size`` consecutive
elements. For a contiguous tensor whose last dimension is a multiple of ``group_size`` these are exactly groups
along the last dimension; otherwise groups continue into the next row and only the last group is padded. Each
group stores its absolute maximum as a float32 scale, so a group's largest magnitude maps to the format's
largest value (127 for int8, 448 for E4M3, 57344 for E5M2).

The eager path is vectorised over groups and reads a float32 input without copying it (a few kernels per direction:
host time matters as much as memory traffic for the many small tensors of a step); large tensors are processed in
chunks of ``chunk_numel`` elements so that the float32 temporaries stay small next to the tensor itself. With
``compile=True`` (and by default on CUDA tensors) the round-to-nearest path of tensors of at least
:data:`COMPILE_MIN_NUMEL` elements runs as one ``torch.compile``-fused kernel per direction (no float32
temporaries; on GPU, Triton kernels close to the memory-traffic floor), falling back to eager where it does not
apply, and for good (with one warning) if compilation fails, e.g. where Triton or a C++ compiler is missing.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["COMPILE_MIN_NUMEL", "FORMATS", "QuantizedTensor", "dequantize", "quantize"]


@dataclass(frozen=True)
class _FormatSpec:
    storage_dtype: torch.dtype
    # largest magnitude the scaled values may take
    max_value: float
    # FP8 only: explicit mantissa bits and the exponent of the smallest normal number (for stochastic rounding)
    mantissa_bits: int = 0
    min_normal_exponent: int = 0


_SPECS: dict[str, _FormatSpec] = {
    "int8": _FormatSpec(torch.int8, 127.0),
    "fp8_e4m3": _FormatSpec(torch.float8_e4m3fn, 448.0, mantissa_bits=3, min_normal_exponent=-6),
    "fp8_e5m2": _FormatSpec(torch.float8_e5m2, 57344.0, mantissa_bits=2, min_normal_exponent=-14),
}

#: The storage formats understood by :func:`quantize`.
FORMATS: tuple[str, ...] = tuple(_SPECS)

_DEFAULT_CHUNK_NUMEL = 1 << 24
_TINY = torch.finfo(torch.float32).tiny
# the formats' largest values as 0-dim float32 tensors (a CPU scalar operand works with tensors on any device)
_MAX_VALUE_TENSORS: dict[float, Tensor] = {}


def _max_value_tensor(spec: _FormatSpec) -> Tensor:
    tensor = _MAX_VALUE_TENSORS.get(spec.max_value)
    if tensor is None:
        tensor = _MAX_VALUE_TENSORS[spec.max_value] = torch.tensor(spec.max_value, dtype=torch.float32)
    return tensor


#: ``compile=True`` uses the fused kernels for tensors of at least this many elements. A call through
#: ``torch.compile``'s wrapper costs tens of microseconds of host time (about 80 us on a server CPU core), more than
#: the eager kernels take on a small tensor; on large ones the fused kernel's single pass over memory pays for it.
COMPILE_MIN_NUMEL = 1 << 20


class QuantizedTensor:
    """A tensor stored in 8 bits with one float32 scale per group; :func:`dequantize` restores it.

    Attributes:
        data: the 8-bit values, flat, padded to a whole number of groups.
        scale: one float32 scale per group (the value of one step of the format's grid).
        shape: shape of the original tensor.
        dtype: dtype of the original tensor (the dtype :func:`dequantize` returns).
        format: one of :data:`FORMATS`.
        group_size: elements per group.
    """

    __slots__ = ("data", "dtype", "format", "group_size", "scale", "shape")

    def __init__(
        self, data: Tensor, scale: Tensor, shape: torch.Size, dtype: torch.dtype, format: str, group_size: int
    ) -> None:
        self.data = data
        self.scale = scale
        self.shape = shape
        self.dtype = dtype
        self.format = format
        self.group_size = group_size

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized values and their scales."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(format={self.format!r}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"group_size={self.group_size}, nbytes={self.nbytes})"
        )


def _check_format(format: str) -> _FormatSpec:
    if format not in _SPECS:
        raise ValueError(
            f"`format` must be one of {', '.join(repr(f) for f in FORMATS)}, got {format!r}."
            " HINT: 'int8' is the most accurate; 'fp8_e4m3' / 'fp8_e5m2' keep more dynamic range per group."
        )
    return _SPECS[format]


def _stochastic_round_fp8(values: Tensor, spec: _FormatSpec, generator: torch.Generator | None) -> Tensor:
    """Round float32 ``values`` (already within the format's range) to a neighbouring FP8 grid point at random.

    The probability of rounding up is the distance to the lower grid point in units of the grid spacing, so the
    rounding is unbiased. The result is exactly representable, so the later cast to FP8 does not round again.
    """
    magnitude = values.abs()
    # frexp: magnitude = m * 2**e with m in [0.5, 1), so floor(log2(magnitude)) = e - 1, exactly
    _, exponent = torch.frexp(magnitude)
    exponent = (exponent - 1).clamp_(min=spec.min_normal_exponent)
    spacing = torch.exp2((exponent - spec.mantissa_bits).to(values.dtype))
    steps = magnitude.div_(spacing)
    lower = steps.floor()
    noise = torch.rand(values.shape, generator=generator, device=values.device, dtype=values.dtype)
    rounded = lower.add_((steps - lower).gt_(noise)).mul_(spacing)
    return rounded.copysign_(values)


def _quantize_block(
    block: Tensor,
    spec: _FormatSpec,
    stochastic_rounding: bool,
    generator: torch.Generator | None,
    keep_nonzero: bool = False,
) -> tuple[Tensor, Tensor]:
    """Quantize ``block`` (groups, group_size) into 8-bit values of that shape and float32 scales (groups, 1).

    ``block`` is read, never written: it may be a view of the caller's tensor. A float32 block is divided into a
    fresh tensor; other dtypes are converted to a float32 copy first (exact), which is then divided in place: on
    16-bit inputs that is fewer and faster kernels than reducing and dividing in the 16-bit dtype, same results.
    """
    if block.dtype is torch.float32:
        copied = False
    else:
        block, copied = block.float(), True
    # Host time: .float() / .char() and a 0-dim tensor divisor dispatch faster than .to(dtype) and a Python scalar.
    scale = block.abs().amax(dim=1, keepdim=True)
    scale = torch.div(scale, _max_value_tensor(spec)).clamp_min_(_TINY)
    values = block.div_(scale) if copied else torch.div(block, scale)
    if spec.storage_dtype is torch.int8 and not stochastic_rounding:
        # |values| <= 127 up to float rounding, which round-to-nearest brings back to 127: no clamp needed
        if keep_nonzero:  # a value below half a step keeps its sign (1 step) instead of becoming 0
            rounded = values.round()
            return torch.where(rounded.eq(0), values.sign(), rounded).char(), scale
        return values.round_().char(), scale
    if spec.storage_dtype is torch.int8:
        noise = torch.rand(values.shape, generator=generator, device=values.device, dtype=values.dtype)
        values.add_(noise).floor_()
    elif stochastic_rounding:
        values = _stochastic_round_fp8(values, spec, generator)
    # float rounding of the division (or rounding up) can land just beyond the format's largest value
    values.clamp_(-spec.max_value, spec.max_value)
    return values.to(spec.storage_dtype), scale


def _dequantize_block(data: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Values of shape (groups, group_size) from 8-bit ``data`` of that shape and float32 ``scale`` (groups, 1).

    bfloat16 is restored in bfloat16 arithmetic (8-bit values convert exactly, and bfloat16 has the range of
    float32); other dtypes go through float32. The result is a fresh tensor, in ``dtype``.
    """
    if dtype is torch.bfloat16:
        return data.bfloat16().mul_(scale.bfloat16())
    values = data.float().mul_(scale)
    return values if dtype is torch.float32 else values.to(dtype)


def _quantize_groups(
    groups: Tensor, max_value: float, round_to_int: bool, storage_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Functional form of :func:`_quantize_block` (round-to-nearest) for ``torch.compile`` to fuse."""
    values = groups.float()
    scale = (values.abs().amax(dim=1, keepdim=True) / max_value).clamp(min=torch.finfo(torch.float32).tiny)
    values = values / scale
    if round_to_int:
        values = values.round()
    return values.clamp(-max_value, max_value).to(storage_dtype), scale.squeeze(1)


def _dequantize_groups(data: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (data.float() * scale.unsqueeze(1)).to(dtype)


def _quantize_int8_groups(groups: Tensor) -> tuple[Tensor, Tensor]:
    return _quantize_groups(groups, 127.0, True, torch.int8)


def _quantize_fp8_e4m3_groups(groups: Tensor) -> tuple[Tensor, Tensor]:
    return _quantize_groups(groups, 448.0, False, torch.float8_e4m3fn)


def _quantize_fp8_e5m2_groups(groups: Tensor) -> tuple[Tensor, Tensor]:
    return _quantize_groups(groups, 57344.0, False, torch.float8_e5m2)


def _dequantize_int8_groups(data: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return _dequantize_groups(data, scale, dtype)


def _dequantize_fp8_e4m3_groups(data: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return _dequantize_groups(data, scale, dtype)


def _dequantize_fp8_e5m2_groups(data: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return _dequantize_groups(data, scale, dtype)


# One function (code object) per format, because torch.compile keeps a bounded number of compiled variants per
# code object; per format the variants are only the tensor dtypes.
_FUSED = {
    "int8": (_quantize_int8_groups, _dequantize_int8_groups),
    "fp8_e4m3": (_quantize_fp8_e4m3_groups, _dequantize_fp8_e4m3_groups),
    "fp8_e5m2": (_quantize_fp8_e5m2_groups, _dequantize_fp8_e5m2_groups),
}


@functools.cache
def _compiled(function: Callable) -> Callable:
    # dynamic shapes: one compilation serves every tensor size
    return torch.compile(function, dynamic=True)


# functions whose compilation failed once: the eager path serves them from then on
_FAILED: set[Callable] = set()


def _use_compiled(compile: bool | None, tensor: Tensor, numel: int) -> bool:
    if compile is None:  # auto: where the eager ops' passes over memory cost most next to the model's kernels
        compile = tensor.is_cuda
    # small tensors: the wrapper's host time outweighs the passes over memory it saves (see COMPILE_MIN_NUMEL);
    # inside a region that torch.compile is tracing, the eager ops are traced (and fused) anyway
    return compile and numel >= COMPILE_MIN_NUMEL and not torch.compiler.is_compiling()


def _run_compiled(function: Callable, *args: Tensor | torch.dtype) -> tuple[Tensor, Tensor] | Tensor | None:
    """``function`` compiled, on ``args``; ``None`` (use eager) if its compilation failed, now or before."""
    if function in _FAILED:
        return None
    try:
        # autocast off: its state is part of what a compiled variant is specialised on (models switch it)
        with torch.autocast(args[0].device.type, enabled=False):
            return _compiled(function)(*args)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of the compiler stack (Triton, C++ compiler, ...)
        _FAILED.add(function)
        warnings.warn(
            f"torch.compile of the 8-bit {function.__name__} kernel failed ({type(error).__name__}: {error});"
            " using the eager kernels from now on (slower on GPU, same results). HINT: pass `compile=False` to"
            " skip the attempt.",
            stacklevel=2,
        )
        return None


def quantize(
    tensor: Tensor,
    format: str = "int8",
    group_size: int = 128,
    stochastic_rounding: bool = False,
    generator: torch.Generator | None = None,
    chunk_numel: int = _DEFAULT_CHUNK_NUMEL,
    compile: bool | None = None,
    keep_nonzero: bool = False,
) -> QuantizedTensor:
    """Quantize a floating-point tensor to 8 bits with one absmax scale per group of ``group_size`` elements.

    Args:
        tensor: the tensor to store; read in row-major (logical) order.
        format: ``"int8"`` (symmetric, 255 levels), ``"fp8_e4m3"`` or ``"fp8_e5m2"``.
        group_size: elements sharing one scale.
        stochastic_rounding: round up or down at random with probabilities that make the rounding unbiased,
            instead of to the nearest value.
        generator: random generator for stochastic rounding (on the tensor's device); the global one if ``None``.
        chunk_numel: elements processed at once by the eager path; bounds the float32 temporaries.
        compile: use the ``torch.compile``-fused kernel for round-to-nearest when the number of elements is a
            multiple of ``group_size`` and at least :data:`COMPILE_MIN_NUMEL` (the first call per format and dtype
            compiles); ``None``: for CUDA tensors.
        keep_nonzero: int8 round-to-nearest only: a non-zero value that would round to 0 becomes one step of its
            sign, so which entries are zero survives exactly (what ReLU's backward reads from its saved output);
            the error bound stays one step. Runs on the eager kernels.

    Returns:
        The :class:`QuantizedTensor`.

    Raises:
        ValueError: for an unknown ``format``, a ``group_size`` below 1, or a tensor that is not floating-point.

    Example::

        >>> x = torch.randn(4, 256)
        >>> q = quantize(x, "int8", group_size=128)
        >>> bool((dequantize(q) - x).abs().max() <= x.abs().max() / 254 + 1e-6)
        True
    """
    spec = _check_format(format)
    if group_size < 1:
        raise ValueError(f"`group_size` must be a positive integer, got {group_size}. HINT: 128 is a good default.")
    if not tensor.is_floating_point():
        raise ValueError(f"Only floating-point tensors can be quantized, got dtype {tensor.dtype}.")
    flat = tensor.detach().reshape(-1)
    numel = flat.numel()
    fusable = not stochastic_rounding and not keep_nonzero and numel % group_size == 0 and numel > 0
    if fusable and _use_compiled(compile, flat, numel):
        fused = _run_compiled(_FUSED[format][0], flat.view(-1, group_size))
        if fused is not None:
            data, scale = fused
            return QuantizedTensor(data.view(-1), scale, tensor.shape, tensor.dtype, format, group_size)
    if 0 < numel <= chunk_numel and numel % group_size == 0:
        # the common case: one block, no padding, no copy of the input
        data, scale = _quantize_block(flat.view(-1, group_size), spec, stochastic_rounding, generator, keep_nonzero)
        return QuantizedTensor(data.view(-1), scale.view(-1), tensor.shape, tensor.dtype, format, group_size)
    n_groups = max(1, -(-numel // group_size))
    data = torch.empty(n_groups * group_size, dtype=spec.storage_dtype, device=flat.device)
    scale = torch.empty(n_groups, dtype=torch.float32, device=flat.device)
    groups_per_chunk = max(1, chunk_numel // group_size)
    # a loop over chunks of many groups, not over groups: one iteration for all but very large tensors
    for first in range(0, n_groups, groups_per_chunk):
        last = min(n_groups, first + groups_per_chunk)
        start, stop = first * group_size, min(numel, last * group_size)
        padded = (last - first) * group_size
        if stop - start == padded:
            block = flat[start:stop]
        else:
            block = torch.zeros(padded, dtype=flat.dtype, device=flat.device)
            block[: stop - start].copy_(flat[start:stop])
        values, scales = _quantize_block(block.view(-1, group_size), spec, stochastic_rounding, generator, keep_nonzero)
        data[first * group_size : last * group_size].copy_(values.view(-1))
        scale[first:last].copy_(scales.view(-1))
    return QuantizedTensor(data, scale, tensor.shape, tensor.dtype, format, group_size)


def dequantize(quantized: QuantizedTensor, compile: bool | None = None) -> Tensor:
    """Restore a contiguous tensor of the original shape and dtype from a :class:`QuantizedTensor`.

    bfloat16 tensors are restored in bfloat16 arithmetic (8-bit values convert exactly, and bfloat16 has the
    range of float32); other dtypes go through float32.

    Args:
        quantized: the output of :func:`quantize`.
        compile: use the ``torch.compile``-fused kernel (float32 arithmetic, one pass) for tensors of at least
            :data:`COMPILE_MIN_NUMEL` elements; ``None``: for CUDA tensors.

    Returns:
        The dequantized tensor.
    """
    data, scale, dtype = quantized.data, quantized.scale, quantized.dtype
    numel = quantized.numel()
    if _use_compiled(compile, data, numel):
        values = _run_compiled(_FUSED[quantized.format][1], data.view(-1, quantized.group_size), scale, dtype)
        if values is not None:
            return values.view(-1)[:numel].view(quantized.shape)
    flat = _dequantize_block(data.view(-1, quantized.group_size), scale.unsqueeze(1), dtype).view(-1)
    if flat.numel() != numel:
        flat = flat[:numel]
    return flat.view(quantized.shape)
