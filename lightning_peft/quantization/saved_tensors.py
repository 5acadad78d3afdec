"""Quantize the tensors autograd saves for backward, through ``torch.autograd.graph.saved_tensors_hooks``.

The one quantizer of the package: the :class:`~lightning_peft.callbacks.ActivationQuantization` callback and the
:class:`~lightning_peft.plugins.ActivationQuantizedPrecision` plugin both drive an :class:`ActivationQuantizer`.

What is never quantized (the tensor is kept as it is):

- model parameters and buffers, found by type and storage; the cast copies of parameters that autocast makes for a
  Linear or a convolution (a bf16 copy is not a Parameter and lives at another address): a trainable one is
  recognised by following ``grad_fn`` through casts and views to an ``AccumulateGrad``, a frozen one (no
  ``grad_fn``) by being a leaf with the shape of a frozen parameter of the attached model. Rather than keeping
  such a copy for backward, the quantizer casts the parameter again when backward needs it
  (``recompute_weight_copies``; bit-identical, since a cast is deterministic) wherever it can prove which
  parameter the copy was made from: a trainable one when the copy's ``grad_fn`` is a cast straight onto the
  parameter's ``AccumulateGrad`` (not a cast of a rearranged view), a frozen one when the copy is saved inside the
  forward of a plain ``nn.Linear`` whose weight it is;
- the weights ``torch.nn.utils.prune`` (Lightning's ``ModelPruning``) computes as ``weight_orig * weight_mask``,
  and their casts: the chain to the ``AccumulateGrad`` may pass a product with a tensor that needs no gradient;
- integer, bool and 8-bit tensors; tensor subclasses and non-strided layouts;
- tensors with fewer than ``min_numel`` elements;
- tensors saved while a module named in ``exclude_modules`` runs its forward, or inside :func:`skip_quantization`.

A storage saved more than once in a step (e.g. the input of the q, k and v projections) is quantized once, and
every saved view of it is rebuilt from that copy. Every restored tensor has the size and strides of the tensor
saved, so the hooks work inside ``torch.compile``-d regions too, whose backward checks them.

One file on purpose (over 600 lines): the pack and unpack hooks, their storage de-duplication and the
site rules that decide what is quantized are one mechanism whose invariants (sizes, strides, views) hold together.
"""

from __future__ import annotations

import contextlib
import fnmatch
import threading
import warnings
import weakref
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft._compat import compiled_modules, own_parameter, tensor_version, view_base
from lightning_peft._validation import check_bool, check_int, check_seed
from lightning_peft.quantization.formats import (
    _SPECS,
    QuantizedTensor,
    _check_format,
    _dequantize_block,
    _quantize_block,
    _use_compiled,
    dequantize,
    quantize,
)

__all__ = ["DEFAULT_MIN_NUMEL", "ActivationQuantizer", "SavedTensorStats", "skip_quantization"]

#: Tensors with fewer elements are kept as they are (at 2 bytes each, at most 128 KiB to gain per tensor).
DEFAULT_MIN_NUMEL = 1 << 16

# grad_fn nodes that only cast or re-view their single input: a chain of these ending in an AccumulateGrad means
# the saved tensor is (a cast / view of) a leaf that requires grad, i.e. a trainable parameter
_CAST_AND_VIEW_NODES = frozenset(
    {
        "ToCopyBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "TBackward0",
        "NumpyTBackward0",
        "TransposeBackward0",
        "TransposeBackward1",
        "PermuteBackward0",
        "ExpandBackward0",
        "AsStridedBackward0",
        "AsStridedBackward1",
        "SliceBackward0",
        "SelectBackward0",
        "UnsqueezeBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "SplitBackward0",
        "SplitWithSizesBackward0",
        "UnbindBackward0",
        "CloneBackward0",
        "AliasBackward0",
    }
)
# `torch.nn.utils.prune` (Lightning's ModelPruning) computes a pruned weight as `weight_orig * weight_mask` in a
# forward pre-hook: a product with one input that needs a gradient, on the way from the saved tensor to the parameter
_MASK_NODES = frozenset({"MulBackward0"})
_PARAMETER_CHAIN_NODES = _CAST_AND_VIEW_NODES | _MASK_NODES
_MAX_CHAIN = 8

_exclusion = threading.local()


@contextlib.contextmanager
def skip_quantization() -> Generator[None, None, None]:
    """Keep every tensor saved for backward inside this block unquantized.

    Unlike entering another ``saved_tensors_hooks`` context, this does not shadow the hooks of an activation
    checkpoint around it, so checkpointing stays effective.

    Example::

        >>> with skip_quantization():
        ...     pass  # e.g. a numerically sensitive layer
    """
    _exclusion.depth = getattr(_exclusion, "depth", 0) + 1
    try:
        yield
    finally:
        _exclusion.depth -= 1


# The module hooks below mark what runs in forward for the pack hook. Inside a torch.compile-d region they would be
# traced into the graph while the pack hook runs when the compiled code does: there they do nothing (and add no
# guards that would recompile the region); `ActivationQuantizer.start_step` says what that leaves out.
def _enter_exclusion(*_: Any) -> None:
    if torch.compiler.is_compiling():
        return
    _exclusion.depth = getattr(_exclusion, "depth", 0) + 1


def _exit_exclusion(*_: Any) -> None:
    if torch.compiler.is_compiling():
        return
    _exclusion.depth = max(0, getattr(_exclusion, "depth", 0) - 1)


# autograd nodes whose backward reads the zeros of their saved output (ReLU's mask): see `_quantize`
_ZERO_MASKED_OUTPUTS = frozenset({"ReluBackward0", "ThresholdBackward0"})


@dataclass
class SavedTensorStats:
    """What one training step saved for backward, as seen by the pack hook.

    Bytes count each storage once, and leave out the storages of the model's own parameters (they are held
    anyway). ``bytes_before`` is what autograd would have held without quantization; ``bytes_after`` what it
    holds with it (8-bit data and scales of quantized tensors, plus every tensor kept as it is).

    Attributes:
        num_saved: tensors handed to the pack hook.
        num_quantized: tensors stored quantized (a deduplicated one counts each time).
        num_deduplicated: saves served by a quantized copy made earlier in the step.
        num_recomputed: saves of autocast's weight copies that backward casts again from the parameter instead.
        bytes_before: unique bytes saved for backward without quantization.
        bytes_after: unique bytes saved for backward with quantization.
        bytes_weight_copies: the part of ``bytes_after`` that is copies of parameters made by autocast (a
            Linear's bf16 weight), kept as they are because their parameter could not be proven (with
            ``recompute_weight_copies``) or is not to be recast (without). They grow with the model, activations
            with the batch: at few tokens per step they bound how far ``bytes_after / bytes_before`` can fall.
    """

    num_saved: int = 0
    num_quantized: int = 0
    num_deduplicated: int = 0
    num_recomputed: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    bytes_weight_copies: int = 0

    @property
    def ratio(self) -> float:
        """``bytes_after / bytes_before`` (1.0 when nothing was saved)."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0


class _QuantizedStorage:
    """One quantized copy of saved data; holds no reference to the autograd graph.

    Either a :class:`QuantizedTensor` (``quantize``'s general path: padding, partial views, fused kernels) or, for
    the common case of a whole dense storage, its 8-bit groups and float32 scales as 2-D tensors (``data``,
    ``scale``), which restore in one kernel with no reshaping.
    """

    __slots__ = ("__weakref__", "_restored", "compile", "data", "dtype", "nbytes", "quantized", "scale")

    def __init__(
        self,
        quantized: QuantizedTensor | None,
        compile: bool | None,
        data: Tensor | None = None,
        scale: Tensor | None = None,
        dtype: torch.dtype | None = None,
        nbytes: int = 0,
    ) -> None:
        self.quantized = quantized
        self.compile = compile
        self.data = data
        self.scale = scale
        self.dtype = dtype
        self.nbytes = nbytes  # the 8-bit values and the float32 scales
        self._restored: weakref.ref[Tensor] | None = None

    def restore(self) -> Tensor:
        # saves of one storage by several nodes share one dequantized tensor while it is alive
        restored = self._restored() if self._restored is not None else None
        if restored is None:
            if self.quantized is None:
                restored = _dequantize_block(self.data, self.scale, self.dtype)
            else:
                restored = dequantize(self.quantized, compile=self.compile)
            self._restored = weakref.ref(restored)
        return restored


def _with_strides(values: Tensor, stride: tuple[int, ...]) -> Tensor:
    """``values`` (contiguous) copied into a tensor of its shape with ``stride``; ``values`` where that cannot be.

    A partial view (e.g. the ``q`` of a fused ``qkv`` output) is quantized alone and restored contiguous; eager
    backward formulas accept any strides, but a ``torch.compile``-d backward asserts the strides its forward saw.
    The new storage spans the view's extent (gaps included), for the time backward holds it. Overlapping strides
    (an expanded tensor) cannot be written to, and are returned contiguous.
    """
    shape = values.shape
    if values.stride() == stride or values.numel() == 0:
        return values
    dims = sorted((st, n) for st, n in zip(stride, shape, strict=True) if n != 1)
    span = 1
    for st, n in dims:
        if st < span:  # an expanded (stride 0) or overlapping dimension
            return values
        span = st * n
    out = values.new_empty(1 + sum((n - 1) * st for st, n in dims)).as_strided(shape, stride)
    return out.copy_(values)


class _SavedView:
    """What the pack hook returns for a quantized tensor: the shared copy and how to view it.

    ``whole``: the copy holds the saved tensor's whole storage, viewed by ``as_strided`` with ``geometry``;
    otherwise it holds the saved view alone (contiguous), restored with the view's strides.
    """

    __slots__ = ("geometry", "storage", "whole")

    def __init__(
        self, storage: _QuantizedStorage, geometry: tuple[torch.Size, tuple[int, ...], int], whole: bool = True
    ) -> None:
        self.storage = storage
        self.geometry = geometry
        self.whole = whole

    def restore(self) -> Tensor:
        restored = self.storage.restore()
        if self.whole:
            return restored.as_strided(*self.geometry)
        return _with_strides(restored, self.geometry[1])


class _Kept:
    """What the pack hook returns for a tensor it keeps: the tensor and its version when it was saved."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: Tensor, version: int) -> None:
        self.tensor = tensor
        self.version = version


class _Recast:
    """What the pack hook returns for autocast's copy of a parameter: the parameter, cast again in backward."""

    __slots__ = ("dtype", "geometry", "parameter", "version")

    def __init__(self, parameter: Tensor, copy: Tensor) -> None:
        self.parameter = weakref.ref(parameter)
        self.dtype = copy.dtype
        self.geometry = (copy.shape, copy.stride(), copy.storage_offset())
        self.version = tensor_version(parameter)

    def restore(self) -> Tensor:
        parameter = self.parameter()
        if parameter is None or parameter.untyped_storage().nbytes() == 0 or tensor_version(parameter) != self.version:
            state = "was freed" if parameter is None or parameter.untyped_storage().nbytes() == 0 else "changed"
            raise RuntimeError(
                f"the parameter whose {self.dtype} copy autograd saved {state} between forward and backward, so"
                " lightning_peft's activation quantization cannot cast it again. HINT: pass"
                " `recompute_weight_copies=False` to keep autocast's copies instead (as autograd would)."
            )
        with torch.no_grad():
            size, stride, offset = self.geometry
            return parameter.to(self.dtype).as_strided(size, stride, offset)


def _keep(tensor: Tensor) -> _Kept:
    # Returning a saved *output* unchanged would let the SavedVariable own the tensor, which owns its grad_fn,
    # which owns the SavedVariable: a cycle through C++ that gc cannot see, leaking the whole graph when a
    # loss is dropped without backward. A detached alias shares storage and version counter but not grad_fn.
    return _Kept(tensor.detach() if tensor.grad_fn is not None else tensor, tensor_version(tensor))


def _unpack(packed: Any) -> Tensor:
    if isinstance(packed, (_SavedView, _Recast)):
        return packed.restore()
    if isinstance(packed, _Kept):
        tensor = packed.tensor
        # autograd skips its in-place check for tensors that went through hooks: do it here
        if tensor_version(tensor) != packed.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation:"
                f" [{tensor.type()} {list(tensor.shape)}] is at version {tensor_version(tensor)}; expected version"
                f" {packed.version} instead (detected by lightning_peft's activation quantization, which kept this"
                " tensor unquantized). HINT: use the out-of-place form of the operation."
            )
        return tensor
    return packed


def _is_dense(tensor: Tensor) -> bool:
    """Whether the elements of ``tensor`` fill a memory range without gaps or overlaps, in any dimension order."""
    if tensor.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(tensor.stride(), tensor.shape, strict=True) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _storage(tensor: Tensor) -> torch.UntypedStorage | None:
    """The storage of a parameter or buffer; ``None`` where it has none to compare with.

    FSDP2 (``fully_shard``) keeps parameters as DTensors: their local shard has a storage, the DTensor wrapper
    does not. The unsharded parameters FSDP2 swaps in for forward are plain ``nn.Parameter`` s, recognised by
    type in the pack hook.
    """
    to_local = getattr(tensor, "to_local", None)
    if to_local is not None:
        tensor = to_local()
    if tensor.layout is not torch.strided or tensor.device.type == "meta":
        return None
    try:
        storage = tensor.untyped_storage()
        storage.data_ptr()
    except RuntimeError:  # a wrapper subclass without storage of its own
        return None
    return storage


def _derives_from_leaf(tensor: Tensor, is_parameter: Callable[[Tensor], bool] | None = None) -> bool:
    """Whether ``tensor`` is a leaf that requires grad, or a cast / view of one (autocast's copy of a weight).

    With ``is_parameter``, a product with a tensor that needs no gradient is followed too, when the leaf it leads
    to is a parameter of the model: ``torch.nn.utils.prune``'s masked weight ``weight_orig * weight_mask``.
    """
    node = tensor.grad_fn
    if node is None:
        return tensor.requires_grad
    masked = False
    for _ in range(_MAX_CHAIN):
        name = type(node).__name__
        if name == "AccumulateGrad":
            return not masked or (is_parameter is not None and is_parameter(node.variable))
        if name in _MASK_NODES:
            masked = True
        elif name not in _CAST_AND_VIEW_NODES:
            return False
        inputs = [fn for fn, _ in node.next_functions if fn is not None]
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return False


_linear_weights = threading.local()


def _enter_linear(module: nn.Module, _: Any) -> None:
    if torch.compiler.is_compiling():
        return
    stack = getattr(_linear_weights, "stack", None)
    if stack is None:
        stack = _linear_weights.stack = []
    stack.append(own_parameter(module, "weight"))  # not `.weight`: no parametrization runs


def _exit_linear(*_: Any) -> None:
    if torch.compiler.is_compiling():
        return
    stack = getattr(_linear_weights, "stack", None)
    if stack:
        stack.pop()


def _current_linear_weight() -> Tensor | None:
    stack = getattr(_linear_weights, "stack", None)
    return stack[-1] if stack else None


def _is_cast_of(base: Tensor, parameter: Tensor) -> bool:
    """Whether ``base`` (a tensor that is no view) can be ``parameter.to(base.dtype)``, element for element.

    The same shape in another floating dtype, both dense in row-major order, ``base`` filling its storage: then
    casting the parameter again rebuilds that storage, and every view a layer saved of it.
    """
    return (
        type(parameter) in (nn.Parameter, torch.Tensor)
        and parameter.is_floating_point()
        and parameter.dtype != base.dtype
        and parameter.shape == base.shape
        and parameter.device == base.device
        and parameter.is_contiguous()
        and base.is_contiguous()
        and base.storage_offset() == 0
        and base.untyped_storage().nbytes() == base.numel() * base.element_size()
    )


class ActivationQuantizer:
    """Stores tensors saved for backward in 8 bits (int8 or FP8, per-group scales) and restores them in backward.

    The idea of ActNN (https://arxiv.org/abs/2104.14129), GACT (https://arxiv.org/abs/2206.11357), Mesa
    (https://arxiv.org/abs/2111.11124) and COAT (https://arxiv.org/abs/2410.19313), without replacing any layer:
    every tensor autograd saves goes through the pack hook. The quantizer decides what to quantize (see the module
    docstring), deduplicates storages within a step and counts the bytes (:class:`SavedTensorStats`).

    Args:
        format: ``"int8"`` (absmax, 255 levels), ``"fp8_e4m3"`` or ``"fp8_e5m2"`` (absmax-scaled FP8).
        group_size: consecutive elements sharing one float32 scale (along the last dimension when it is a
            multiple of ``group_size``).
        min_numel: tensors with fewer elements are kept as they are.
        stochastic_rounding: unbiased random rounding instead of round-to-nearest; uses its own generator, so
            the global RNG (dropout, activation-checkpoint replay) is untouched.
        exclude_modules: glob patterns of module names (as in ``named_modules()``, e.g. ``"head"`` or
            ``"blocks.0.*"``) whose saved tensors are kept as they are; needs :meth:`attach`.
        seed: seed of the stochastic-rounding generators.
        compile: quantize and dequantize with ``torch.compile``-fused kernels (round-to-nearest, sizes that are
            a multiple of ``group_size``; eager otherwise). ``None`` (default): for tensors on a CUDA GPU, where
            the eager ops' several passes over memory cost most (the first step pays for compilation; if
            compilation fails, one warning and eager from then on); ``True``: also on CPU; ``False``: never.
        recompute_weight_copies: instead of keeping autocast's low-precision copy of a weight until backward
            (2 bytes per parameter of the model under bf16 autocast: 2.1 GiB of a 1.1B model), cast the weight
            again when backward needs it. Bit-identical, and it costs one cast per weight in backward; applies
            to trainable weights (proven through the autograd graph) and to frozen weights of plain
            ``nn.Linear`` layers (proven by the layer whose forward saves them). A weight changed in place
            between forward and backward raises an error, as autograd would.

    Raises:
        ValueError: for an unknown ``format``, a ``group_size`` below 1, a negative ``min_numel``, an
            ``exclude_modules`` that is not a list of strings or a ``recompute_weight_copies`` that is not a bool.

    Example::

        >>> model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1))
        >>> quantizer = ActivationQuantizer("int8", min_numel=1024)
        >>> quantizer.attach(model)
        >>> with quantizer.step():
        ...     loss = model(torch.randn(64, 256)).sum()
        >>> loss.backward()
        >>> quantizer.stats.num_quantized > 0
        True
    """

    def __init__(
        self,
        format: str = "int8",
        group_size: int = 128,
        min_numel: int = DEFAULT_MIN_NUMEL,
        stochastic_rounding: bool = False,
        exclude_modules: Iterable[str] | None = None,
        seed: int = 0,
        compile: bool | None = None,
        recompute_weight_copies: bool = True,
    ) -> None:
        _check_format(format)
        check_int(
            "group_size",
            group_size,
            1,
            "128 (the default) matches the hidden sizes of most transformers; smaller groups are more accurate and"
            " store more scales.",
        )
        check_int(
            "min_numel",
            min_numel,
            0,
            f"use 0 to quantize every floating-point tensor, or {DEFAULT_MIN_NUMEL} (the default).",
        )
        check_bool("stochastic_rounding", stochastic_rounding)
        check_seed("seed", seed)
        if compile is not None:
            check_bool("compile", compile)
        if isinstance(exclude_modules, str) or (
            exclude_modules is not None and not all(isinstance(p, str) for p in exclude_modules)
        ):
            raise ValueError(
                f"`exclude_modules` must be a list of module-name patterns, got {exclude_modules!r}."
                ' HINT: write `exclude_modules=["head"]` (a list), not `exclude_modules="head"`.'
            )
        check_bool("recompute_weight_copies", recompute_weight_copies)
        self.format = format
        self.group_size = group_size
        self.min_numel = min_numel
        self.stochastic_rounding = stochastic_rounding
        self.exclude_modules = list(exclude_modules or [])
        self.seed = seed
        self.compile = compile
        self.recompute_weight_copies = recompute_weight_copies
        self.stats = SavedTensorStats()
        # nothing below refers to the model or to the autograd graph: the graph keeps the pack hook alive
        self._module_ref: weakref.ref[nn.Module] | None = None
        self._hook_handles: list[Any] = []
        # address -> the parameter's storage: the weak reference proves the address was not handed on (FSDP2 frees
        # the unsharded parameters of a block after its forward, and the allocator reuses their memory)
        self._param_storages: dict[int, weakref.ref] = {}
        self._frozen_shapes: set[torch.Size] = set()
        self._counted: dict[int, weakref.ref] = {}
        self._kept: dict[int, weakref.ref] = {}
        self._cache: dict[tuple, tuple[weakref.ref, int, _QuantizedStorage, bool]] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._parameters_stale = False
        self._compile_checked = False
        self._excluded: list[weakref.ref[nn.Module]] = []  # the modules `exclude_modules` matched

    def __getstate__(self) -> dict[str, Any]:
        # pickled (ddp_spawn) or deep-copied without the run-time links: model, hooks, caches, generators
        state = self.__dict__.copy()
        state.update(
            _module_ref=None,
            _hook_handles=[],
            _param_storages={},
            _frozen_shapes=set(),
            _counted={},
            _kept={},
            _cache={},
            _generators={},
            _hooks=None,
            _compile_checked=False,
            _excluded=[],
        )
        return state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(format={self.format!r}, group_size={self.group_size}, "
            f"min_numel={self.min_numel}, stochastic_rounding={self.stochastic_rounding})"
        )

    # ----------------------------------------------------------------------------------------------- model
    def attach(self, module: nn.Module) -> None:
        """Know the model: its parameters are never quantized, and ``exclude_modules`` are looked up in it.

        Holds only a weak reference to ``module``. Calling it again replaces the previous attachment.

        Raises:
            ValueError: if a pattern of ``exclude_modules`` matches no module name.
        """
        self.detach()
        self._compile_checked = False
        self._excluded.clear()
        self._module_ref = weakref.ref(module)
        names = [name for name, _ in module.named_modules() if name]
        for pattern in self.exclude_modules:
            matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
            if not matched:
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise ValueError(
                    f"`exclude_modules` pattern {pattern!r} matches no module of {type(module).__name__}."
                    f" Module names start with: {shown}. HINT: patterns are globs over `named_modules()` names,"
                    ' e.g. "head" or "blocks.*.attn".'
                )
        for name, submodule in module.named_modules():
            if name and any(fnmatch.fnmatchcase(name, p) for p in self.exclude_modules):
                self._excluded.append(weakref.ref(submodule))
                self._hook_handles.append(submodule.register_forward_pre_hook(_enter_exclusion))
                self._hook_handles.append(submodule.register_forward_hook(_exit_exclusion, always_call=True))
            # the layers whose frozen weight's copy can be recast: nn.Linear's own forward, an unparametrized weight
            if (
                self.recompute_weight_copies
                and type(submodule).forward is nn.Linear.forward
                and isinstance(own_parameter(submodule, "weight"), torch.Tensor)
            ):
                self._hook_handles.append(submodule.register_forward_pre_hook(_enter_linear))
                self._hook_handles.append(submodule.register_forward_hook(_exit_linear, always_call=True))
        self.refresh_parameters()

    def detach(self) -> None:
        """Forget the model and remove the hooks :meth:`attach` put on it."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        self._module_ref = None
        self._param_storages.clear()
        self._frozen_shapes.clear()

    def refresh_parameters(self) -> None:
        """Re-read the attached model's parameters: where they live (``.to()``, strategies) and which are frozen."""
        self._parameters_stale = False
        module = self._module_ref() if self._module_ref is not None else None
        self._param_storages.clear()
        self._frozen_shapes.clear()
        if module is None:
            return
        for tensor in (*module.parameters(), *module.buffers()):
            storage = _storage(tensor)
            if storage is not None:
                self._param_storages[storage.data_ptr()] = weakref.ref(storage)
        for param in module.parameters():
            if not param.requires_grad and param.is_floating_point():
                self._frozen_shapes.add(param.shape)

    # ----------------------------------------------------------------------------------------------- steps
    def start_step(self) -> None:
        """Begin a step: fresh statistics and deduplication cache; parameters are re-read at the first save."""
        self.stats = SavedTensorStats()
        self._counted.clear()
        self._kept.clear()
        self._cache.clear()
        # read lazily: callbacks running after this one (LISA...) may still change what is frozen
        self._parameters_stale = True
        if not self._compile_checked:
            self._compile_checked = True
            self._warn_if_excluding_in_compiled_regions()

    def _warn_if_excluding_in_compiled_regions(self) -> None:
        module = self._module_ref() if self._module_ref is not None else None
        if module is None or not self._excluded:
            return
        excluded = {id(ref()) for ref in self._excluded if ref() is not None}
        if not any(id(m) in excluded for region in compiled_modules(module) for m in region.modules()):
            return
        warnings.warn(
            f"`exclude_modules={self.exclude_modules}` cannot apply inside the torch.compile-d parts of"
            f" {type(module).__name__}: what a compiled region saves for backward is quantized whichever module"
            " saved it (the quantization itself works there). HINT: compile only the modules to quantize (e.g."
            " each block), or wrap the excluded computation in `torch.compiler.disable`.",
            stacklevel=2,
        )

    def end_step(self) -> SavedTensorStats:
        """End a step: drop the deduplication cache (quantized copies live on in the graph); return the stats."""
        self._counted.clear()
        self._kept.clear()
        self._cache.clear()
        return self.stats

    @property
    def hooks_active(self) -> bool:
        """Whether :meth:`enable_hooks` is in effect."""
        return self._hooks is not None

    def enable_hooks(self) -> None:
        """Push the pack / unpack hooks (for code that cannot use a ``with`` block, like callbacks)."""
        if self._hooks is None:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack)
            self._hooks.__enter__()

    def disable_hooks(self) -> None:
        """Pop the hooks pushed by :meth:`enable_hooks`; does nothing if they are not active."""
        if self._hooks is not None:
            hooks, self._hooks = self._hooks, None
            hooks.__exit__(None, None, None)

    @contextlib.contextmanager
    def saved_tensors_hooks(self) -> Generator[None, None, None]:
        """Quantize what is saved for backward inside this block (statistics accumulate in :attr:`stats`)."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack):
            yield

    @contextlib.contextmanager
    def step(self) -> Generator[SavedTensorStats, None, None]:
        """One forward pass: :meth:`start_step`, the hooks, :meth:`end_step`; yields the step's statistics.

        Run ``backward`` after the block: autograd restores the tensors whether or not the hooks are active.
        """
        self.start_step()
        try:
            with self.saved_tensors_hooks():
                yield self.stats
        finally:
            self.end_step()

    # ----------------------------------------------------------------------------------------------- hooks
    def _count_once(self, table: dict[int, weakref.ref], storage: torch.UntypedStorage) -> bool:
        # The weak reference proves the address still belongs to the same storage: after a storage is freed
        # (e.g. because its only saved copy was quantized), the allocator hands the address to new tensors.
        ptr = storage.data_ptr()
        ref = table.get(ptr)
        if ref is not None and ref() is storage:
            return False
        table[ptr] = weakref.ref(storage)
        return True

    def _is_parameter_copy(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` (not in a parameter's storage) is a cast / view of a parameter."""
        if _derives_from_leaf(tensor, self._is_model_parameter):
            return True
        # autocast's copy of a frozen weight: a leaf without grad_fn (or a view of one) shaped like a frozen param
        base = view_base(tensor)
        return base.grad_fn is None and not base.requires_grad and base.shape in self._frozen_shapes

    def _is_model_parameter(self, tensor: Tensor) -> bool:
        storage = _storage(tensor)
        if storage is None:
            return False
        known = self._param_storages.get(storage.data_ptr())
        return known is not None and known() is storage

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if not self.stochastic_rounding:
            return None
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._generators[device] = generator
        return generator

    def pack(self, tensor: Tensor) -> Any:
        """The pack hook: a handle to the quantized copy of an activation, or to the (detached) tensor kept as is."""
        # The hot path of every saved tensor: each attribute read and call here costs host time on every step,
        # so values are read once and the common case (an activation to quantize) takes the fewest branches.
        if self._parameters_stale:
            self.refresh_parameters()
        stats = self.stats
        stats.num_saved += 1
        # parameters (also where the storage moves during the step: DeepSpeed ZeRO-3 gathers into the Parameter),
        # tensor subclasses, non-strided layouts and meta tensors are kept as they are, uncounted
        if type(tensor) is not torch.Tensor or tensor.layout is not torch.strided or tensor.is_meta:
            return _keep(tensor)
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        param_storage = self._param_storages.get(ptr)
        if param_storage is not None and param_storage() is storage:
            return _keep(tensor)
        nbytes = storage.nbytes()
        # The weak reference proves the address still belongs to the same storage: after a storage is freed
        # (e.g. because its only saved copy was quantized), the allocator hands the address to new tensors.
        counted = self._counted.get(ptr)
        if counted is None or counted() is not storage:
            self._counted[ptr] = weakref.ref(storage)
            stats.bytes_before += nbytes
        if not tensor.is_floating_point() or tensor.element_size() < 2 or getattr(_exclusion, "depth", 0) > 0:
            return self._keep_counted(tensor, storage, ptr, nbytes)
        node = tensor.grad_fn
        # an activation's grad_fn is a computing node; only a cast / view chain (or none) can lead to a parameter
        if (node is None or type(node).__name__ in _PARAMETER_CHAIN_NODES) and self._is_parameter_copy(tensor):
            source = self._copied_parameter(tensor) if self.recompute_weight_copies else None
            if source is not None:
                stats.num_recomputed += 1
                return _Recast(source, tensor)
            if self._count_once(self._kept, storage):
                stats.bytes_weight_copies += nbytes
                stats.bytes_after += nbytes
            return _keep(tensor)
        numel = tensor.numel()
        if numel < self.min_numel or numel == 0:
            return self._keep_counted(tensor, storage, ptr, nbytes)
        return self._quantize(tensor, storage, ptr, nbytes, numel)

    def _keep_counted(self, tensor: Tensor, storage: torch.UntypedStorage, ptr: int, nbytes: int) -> _Kept:
        kept = self._kept.get(ptr)
        if kept is None or kept() is not storage:
            self._kept[ptr] = weakref.ref(storage)
            self.stats.bytes_after += nbytes
        return _keep(tensor)

    @staticmethod
    def _copied_parameter(copy: Tensor) -> Tensor | None:
        """The parameter of which ``copy`` is autocast's cast (or a view of it), where that can be proven."""
        base = view_base(copy)
        node = base.grad_fn
        if node is not None:
            # a trainable weight's copy: one cast straight from the weight (not from a rearranged view of it)
            if type(node).__name__ != "ToCopyBackward0":
                return None
            inputs = [fn for fn, _ in node.next_functions if fn is not None]
            if len(inputs) != 1 or type(inputs[0]).__name__ != "AccumulateGrad":
                return None
            source = inputs[0].variable
        else:
            # a frozen weight's copy has no grad_fn: inside a plain nn.Linear's forward, a leaf saved with the
            # weight's shape can only be the weight's copy (the input is saved only for a trainable weight)
            source = _current_linear_weight()
            if source is None or source.requires_grad or base.requires_grad:
                return None
        return source if _is_cast_of(base, source) else None

    def _quantize(self, tensor: Tensor, storage: torch.UntypedStorage, ptr: int, nbytes: int, numel: int) -> _SavedView:
        stats = self.stats
        stats.num_quantized += 1
        version, dtype = tensor_version(tensor), tensor.dtype
        geometry = (tensor.shape, tensor.stride(), tensor.storage_offset())
        covers_storage = numel * tensor.element_size() == nbytes and _is_dense(tensor)
        # a copy of the whole storage serves every view of it; a partial view only serves the same view again
        cache = self._cache
        whole_key = (ptr, dtype)
        # the output of ReLU is saved for a backward that reads which entries are zero: those must survive exactly
        # (int8 would round small positives to 0 and drop their gradient); a copy made that way serves everyone
        keep_nonzero = self.format == "int8" and type(tensor.grad_fn).__name__ in _ZERO_MASKED_OUTPUTS
        cached = cache.get(whole_key)
        if cached is not None and cached[0]() is storage and cached[1] == version and cached[3] >= keep_nonzero:
            stats.num_deduplicated += 1
            return _SavedView(cached[2], geometry)
        key = whole_key
        if not covers_storage:
            key = (ptr, dtype, *geometry)
            cached = cache.get(key)
            if cached is not None and cached[0]() is storage and cached[1] == version and cached[3] >= keep_nonzero:
                stats.num_deduplicated += 1
                return _SavedView(cached[2], geometry, whole=False)
        group_size = self.group_size
        generator = self._generator(tensor.device) if self.stochastic_rounding else None
        # detached, not under no_grad: the same effect (no graph is recorded) at a fraction of the host time
        source = tensor.detach()
        compiled = self.compile is not False and not keep_nonzero and _use_compiled(self.compile, tensor, numel)
        if covers_storage and numel % group_size == 0 and not compiled:
            # the common case: a whole dense storage in groups, read in memory order (so that any view of it is
            # rebuilt by as_strided), quantized without reshaping or copying
            groups = numel // group_size
            data, scale = _quantize_block(
                source.as_strided((groups, group_size), (group_size, 1), 0),
                _SPECS[self.format],
                self.stochastic_rounding,
                generator,
                keep_nonzero,
            )
            packed = _QuantizedStorage(None, self.compile, data, scale, dtype, numel + 4 * groups)
        else:
            # a whole storage is quantized in memory order, so that any view of it can be rebuilt by as_strided
            quantized = quantize(
                source.as_strided((numel,), (1,), 0) if covers_storage else source,
                self.format,
                group_size,
                self.stochastic_rounding,
                generator,
                compile=self.compile,
                keep_nonzero=keep_nonzero,
            )
            packed = _QuantizedStorage(quantized, self.compile, nbytes=quantized.nbytes)
        stats.bytes_after += packed.nbytes
        cache[key] = (weakref.ref(storage), version, packed, keep_nonzero)
        return _SavedView(packed, geometry, whole=covers_storage)
