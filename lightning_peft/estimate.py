"""Where training memory goes, per method, before the first step: an estimate from fake tensors.

:func:`estimate_memory` builds the model on the ``meta`` device (no weights are allocated or read), runs one
forward of the loss under ``FakeTensorMode`` (shapes, dtypes and the autograd graph, no arithmetic) and counts what
autograd saves for backward through ``torch.autograd.graph.saved_tensors_hooks``, as
``benchmarks/memory.py`` counts it in a real step. For each method of the registry (:mod:`lightning_peft.methods`) that
chooses what trains -- full fine-tuning, LoRA, LISA, Half Fine-Tuning, and any method registered with
:func:`~lightning_peft.methods.register_method` -- and each with any combination of 8-bit activations, an 8-bit
optimizer (bitsandbytes ``AdamW8bit``), activation checkpointing and the optimizer step in backward
(:class:`~lightning_peft.callbacks.OptimizerInBackward`), it reports:

- *params*: unique bytes of every parameter;
- *grads*: bytes of the trainable parameters' gradients (same dtype as the parameters), plus, for a weight used
  twice in the forward (a tied embedding and head), its first partial gradient, which autograd holds until the
  second is made and summed into it. With the optimizer step in backward, the largest trainable parameter's
  gradient (each gradient is stepped and freed as soon as it is complete), again twice for a tied weight. With
  gradient accumulation (``accumulate_grad_batches > 1``) every gradient is held between micro-batches, so the
  gradients count in full there too;
- *optimizer state*: AdamW's two moments (parameter dtype) and step counters; ``AdamW8bit``'s 8-bit moments with
  one float32 absmax per block of 256 and its two shared 256-entry maps (32-bit moments under ``min_8bit_size``);
- *saved activations*: unique bytes saved for backward, parameters excluded; autocast's weight copies (a
  Linear's bf16 weight under ``bf16-mixed``) are part of them and shown apart. With 8-bit activations, every
  floating tensor of at least ``min_numel`` elements that is not a weight copy is counted as 1 byte per element
  (padded to whole groups) plus a float32 scale per group, and weight copies as recast in backward (none held),
  as :class:`~lightning_peft.quantization.ActivationQuantizer` stores them. With activation checkpointing of each
  block: the block inputs, what is saved outside the blocks, and one block's saved tensors at a time (its
  recomputation in backward).

Saved activations grow linearly with the batch: two forwards (batch ``b`` and ``2b``) give the slope, from
which :meth:`MemoryReport.largest_batch_size` solves for a memory budget; :attr:`MemoryReport.smallest` names each
method's smallest combination. The total is the step's peak, at the larger of two moments: the start of backward
(every saved activation, two gradients of the size of the largest one, and the first parameter gradients) and its
end (the gradients; the activations are freed by then), each on top of the parameters and the optimizer state
(:class:`MemoryEstimate`). Not counted: the CUDA context, allocator fragmentation, temporary buffers of single
kernels, the data loader; on GPU, expect the allocator's peak a few percent to some tens of percent above the
estimate.

One file on purpose (over 600 lines): counting saved tensors, optimizer state and variants shares one fake
forward and one report; the command line lives in :mod:`lightning_peft.cli.estimate`.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft._compat import (
    efficient_attention,
    fake_tensor,
    fake_tensor_mode,
    flash_attention_cpu,
    hf_auto_models_from_config,
    hf_masks_as_in_a_real_run,
    storage_id,
    view_base,
)
from lightning_peft.layout import LayerStack, find_blocks
from lightning_peft.methods import Method, get_method, methods
from lightning_peft.quantization.saved_tensors import _derives_from_leaf

__all__ = [
    "METHODS",
    "VARIANTS",
    "MemoryEstimate",
    "MemoryReport",
    "estimate_memory",
    "format_bytes",
    "parse_bytes",
]

#: The built-in methods the estimator makes rows for (the registry's methods whose ``estimate`` is ``"trainable"``;
#: :func:`estimated_methods` adds those registered later).
METHODS: tuple[str, ...] = tuple(m.name for m in methods() if m.estimate == "trainable")
#: The parts a variant combines, in the order a variant names them, with their labels: 8-bit activations, AdamW8bit,
#: activation checkpointing, the optimizer step in backward.
VARIANT_PARTS: dict[str, str] = {
    "int8_act": "8-bit activations",
    "adamw8bit": "AdamW8bit",
    "checkpointing": "checkpointing",
    "in_backward": "optimizer in backward",
}
_BASE_VARIANTS = (
    "",
    "int8_act",
    "adamw8bit",
    "checkpointing",
    "int8_act+adamw8bit",
    "int8_act+checkpointing",
    "adamw8bit+checkpointing",
    "int8_act+adamw8bit+checkpointing",
)
#: What each method is estimated with, besides plain AdamW: every combination of :data:`VARIANT_PARTS` (``""`` is
#: the method alone).
VARIANTS: tuple[str, ...] = _BASE_VARIANTS + tuple(f"{v}+in_backward".lstrip("+") for v in _BASE_VARIANTS)
VARIANT_LABELS = {v: " + ".join(VARIANT_PARTS[p] for p in v.split("+")) for v in VARIANTS if v}
_PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
_BNB_BLOCK = 256  # bitsandbytes' block size of the 8-bit optimizer state
_CONFIGURED = "configured"  # the row of the model's trainable set as built


def estimated_methods() -> tuple[str, ...]:
    """The names of the registered methods the estimator makes rows for (``estimate`` is ``"trainable"``).

    Example::

        >>> estimated_methods()[:4]
        ('full', 'lora', 'lisa', 'hft')
    """
    return tuple(m.name for m in methods() if m.estimate == "trainable")


def _method_label(name: str) -> str:
    if name == _CONFIGURED:
        return "As configured"
    try:
        return get_method(name).label
    except KeyError:
        return name


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimated memory of one method, in bytes.

    Attributes:
        method: the name of a registered method (``"full"``, ``"lora"``, ``"lisa"``, ``"hft"``, ...) or
            ``"configured"``, with ``+variant`` suffixes (``"lisa+int8_act+adamw8bit"``).
        params: unique bytes of all parameters.
        grads: bytes of the gradients of the trainable parameters.
        optimizer_state: bytes of the optimizer state.
        saved_activations: bytes saved for backward at this batch size (weight copies included).
        weight_copies: the part of ``saved_activations`` that is autocast's copies of weights.
        trainable_params: trainable parameter elements.
        total_params: all parameter elements.
        activation_bytes_per_sample: how much ``saved_activations + recomputed`` grows per added sample.
        batch_size: the batch size of ``saved_activations``.
        recomputed: with checkpointing, one block's saved tensors, rebuilt in backward while that block's
            gradients are computed (held only then; part of the peak, not of what the forward leaves behind); with
            ``CausalLM``'s chunked loss, one chunk's, rebuilt at the start of backward (the larger of the two).
        working: the gradients backward makes of the activations while it runs, at this batch size: two of the
            size of the largest saved activation (at the loss of a language model, the gradient of the logits and
            of their log-softmax), held at the start of backward beside every saved activation.
        first_grads: the gradients backward makes first, while every activation is still held (the head's when
            it trains; a tied weight's first partial gradient).
        title: the method's label when it is not a registered method's (a method's choice, e.g. "LISA, embeddings
            frozen").

    The peak of a step is at one of two moments: the start of backward (parameters, optimizer state, every saved
    activation, the working gradients and the first parameter gradients) or its end (parameters, optimizer state
    and the gradients; the activations are freed by then). :attr:`total` is the larger; :attr:`held` is the plain
    sum of the components, what a step holds if nothing were freed in backward.

    Example::

        >>> row = MemoryEstimate("full", 4, 4, 8, 16, 0, 1, 1, 8.0, 2)
        >>> row.total, row.held  # params + optimizer + max(activations, grads); the plain sum
        (28, 32)
    """

    method: str
    params: int
    grads: int
    optimizer_state: int
    saved_activations: int
    weight_copies: int
    trainable_params: int
    total_params: int
    activation_bytes_per_sample: float
    batch_size: int
    recomputed: int = 0
    working: int = 0
    first_grads: int = 0
    title: str = ""

    @property
    def activations(self) -> int:
        """Saved activations plus, with checkpointing, the block recomputed in backward."""
        return self.saved_activations + self.recomputed

    @property
    def backward_start(self) -> int:
        """What the start of backward holds besides parameters and optimizer state.

        Saved activations (and the recomputed block), the working gradients and the first parameter gradients.
        """
        return self.activations + self.working + self.first_grads

    @property
    def total(self) -> int:
        """The estimated peak: params + optimizer state + the larger of :attr:`backward_start` and grads."""
        return self.params + self.optimizer_state + max(self.backward_start, self.grads)

    @property
    def held(self) -> int:
        """Params + grads + optimizer state + saved activations (+ the recomputed block): the plain sum."""
        return self.params + self.grads + self.optimizer_state + self.activations

    def total_at(self, batch_size: int) -> int:
        """The total at another batch size (saved activations and working gradients scale linearly with it).

        Example::

            >>> MemoryEstimate("full", 4, 4, 8, 16, 0, 1, 1, 8.0, 2).total_at(4)
            44
        """
        activations = self.activations + self.activation_bytes_per_sample * (batch_size - self.batch_size)
        working = self.working * batch_size / max(1, self.batch_size)
        start = max(0, int(activations)) + int(working) + self.first_grads
        return self.params + self.optimizer_state + max(start, self.grads)

    @property
    def base_method(self) -> str:
        """The method without its variant, e.g. ``"lisa"`` of ``"lisa+int8_act+in_backward"``."""
        return self.method.split("+", 1)[0]

    @property
    def variant(self) -> str:
        """The variant, e.g. ``"int8_act+in_backward"`` of ``"lisa+int8_act+in_backward"`` (``""``: none)."""
        return self.method.partition("+")[2]

    @property
    def method_label(self) -> str:
        """The method's readable name, e.g. ``"LISA"`` or ``"LISA, embeddings frozen"``."""
        return self.title or _method_label(self.base_method)

    @property
    def label(self) -> str:
        """Readable name, e.g. ``"LISA + 8-bit activations"``."""
        label = self.method_label
        variant = self.variant
        return label + (f" + {VARIANT_LABELS.get(variant, variant)}" if variant else "")


@dataclass
class MemoryReport:
    """The estimates of every method for one model, batch and precision.

    Attributes:
        model: the model's class name.
        batch_size: the batch size the estimates are for.
        precision: the Lightning precision.
        rows: one :class:`MemoryEstimate` per method and variant.
        notes: what the estimate assumed or left out (e.g. a method it could not apply).

    Example::

        >>> report = MemoryReport("M", 2, "32-true", [MemoryEstimate("full", 4, 4, 8, 16, 0, 1, 1, 8.0, 2)])
        >>> report.row("full").total, report.largest_batch_size("full", 44)
        (28, 4)
        >>> report.smallest
        {'full': 'full'}
    """

    model: str
    batch_size: int
    precision: str
    rows: list[MemoryEstimate]
    notes: list[str] = field(default_factory=list)

    def row(self, method: str) -> MemoryEstimate:
        """The estimate of ``method`` (e.g. ``"lisa+int8_act"``).

        Raises:
            KeyError: if the report has no such row.
        """
        for row in self.rows:
            if row.method == method:
                return row
        raise KeyError(f"no estimate for {method!r}; the report has {', '.join(r.method for r in self.rows)}")

    @property
    def smallest(self) -> dict[str, str]:
        """For each method (``"lisa"``, ``"configured"``, ...), the row of its smallest total (``"lisa+int8_act+..."``).

        Among the rows of the report: combinations that cannot run (e.g. the optimizer step in backward under a
        multi-device strategy) are not in it. Ties go to the row listed first (fewer parts).
        """
        best: dict[str, MemoryEstimate] = {}
        for row in self.rows:
            kept = best.get(row.base_method)
            if kept is None or row.total < kept.total:
                best[row.base_method] = row
        return {method: row.method for method, row in best.items()}

    def largest_batch_size(self, method: str, budget: int) -> int:
        """The largest batch size whose estimated total fits in ``budget`` bytes (0 if not even 1 fits)."""
        row = self.row(method)
        per_sample = row.activation_bytes_per_sample + row.working / max(1, row.batch_size)
        if per_sample <= 0:
            return row.batch_size if row.total <= budget else 0
        if row.total_at(1) > budget:
            return 0
        # total_at grows with the batch: double, then bisect
        low, high = 1, 2
        while row.total_at(high) <= budget:
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if row.total_at(middle) <= budget else (low, middle)
        return low

    def to_text(self, budget: int | None = None) -> str:
        """The table (GiB / MiB per component), and with ``budget`` which rows fit and their largest batch."""
        unit, scale = ("GiB", 2**30) if max(r.total for r in self.rows) >= 2**30 else ("MiB", 2**20)
        header = ["Method", "Trainable", "Params", "Grads", "Optimizer", "Activations", "(weight copies)", "Working"]
        header += ["Total"]
        if budget is not None:
            header += [f"Fits {format_bytes(budget)}", "Largest batch"]
        table = [header]
        for row in self.rows:
            cells = [
                row.label,
                f"{row.trainable_params / max(1, row.total_params):.1%}",
                *(f"{v / scale:.2f}" for v in (row.params, row.grads, row.optimizer_state, row.activations)),
                f"{row.weight_copies / scale:.2f}",
                f"{(row.working + row.first_grads) / scale:.2f}",
                f"{row.total / scale:.2f}",
            ]
            if budget is not None:
                cells += ["yes" if row.total <= budget else "no", str(self.largest_batch_size(row.method, budget))]
            table.append(cells)
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        lines = [
            f"Estimated training memory of {self.model}, batch size {self.batch_size}, precision {self.precision}"
            f" ({unit}):",
            "",
        ]
        for index, cells in enumerate(table):
            aligned = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
            lines.append("  ".join(aligned))
            if index == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += [
            "",
            "Total = Params + Optimizer + the larger of Activations + Working (the start of backward: every saved"
            " activation, the gradients of the largest one and the first parameter gradients) and Grads (its end).",
            "",
        ]
        for method in self.smallest.values():
            row = self.row(method)
            fits = (
                f", largest batch in {format_bytes(budget)}: {self.largest_batch_size(method, budget)}"
                if budget is not None
                else ""
            )
            lines.append(f"Smallest for {row.method_label}: {row.label} ({row.total / scale:.2f} {unit}{fits})")
        lines += [f"Note: {note}" for note in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- byte strings

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_bytes(text: str | int) -> int:
    """Bytes from ``"24GiB"``, ``"80 GB"``, ``"512MiB"`` or a plain number.

    Raises:
        ValueError: for anything else.

    Example::

        >>> parse_bytes("24GiB"), parse_bytes("1.5 GB"), parse_bytes(1024)
        (25769803776, 1500000000, 1024)
    """
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"`memory` must be a size such as '24GiB', '80GB' or '512MiB', got {text!r}."
            " HINT: units are B, KB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (powers of 1024)."
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """``n`` bytes in GiB or MiB, e.g. ``"24.0GiB"``.

    Example::

        >>> format_bytes(3 * 2**30)
        '3.0GiB'
    """
    return f"{n / 2**30:.1f}GiB" if n >= 2**30 else f"{n / 2**20:.1f}MiB"


# ----------------------------------------------------------------------------------------------- fake model


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Call ``factory`` with the default device ``meta`` (and Hugging Face checkpoints read as configs only).

    Example::

        >>> build_on_meta(lambda: nn.Linear(4096, 4096)).weight.device
        device(type='meta')
    """
    with torch.device("meta"), hf_auto_models_from_config():
        return factory()


def _fake_module(module: nn.Module, mode: Any, device: torch.device) -> None:
    """Swap every meta parameter and buffer of ``module`` for a fake tensor on ``device`` (in place)."""

    def fake(tensor: Tensor) -> Tensor:
        return fake_tensor(mode, tensor if tensor.is_meta else tensor.to("meta"), device)

    swapped: dict[int, nn.Parameter] = {}  # tied parameters stay tied
    for submodule in module.modules():
        for name, param in list(submodule.named_parameters(recurse=False)):
            if id(param) not in swapped:
                swapped[id(param)] = nn.Parameter(fake(param.data), requires_grad=param.requires_grad)
            setattr(submodule, name, swapped[id(param)])
        for name, buffer in list(submodule.named_buffers(recurse=False)):
            setattr(submodule, name, fake(buffer))


def _to_fake_batch(batch: Any, mode: Any, device: torch.device, batch_size: int | None) -> Any:
    """The batch as fake tensors on ``device``; with ``batch_size``, the first dimension of each tensor resized."""
    if isinstance(batch, Tensor):
        shape = list(batch.shape)
        if batch_size is not None and shape:
            shape[0] = batch_size
        with mode:
            if batch.is_floating_point():
                return torch.empty(shape, dtype=batch.dtype, device=device)
            return torch.zeros(shape, dtype=batch.dtype, device=device)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_fake_batch(v, mode, device, batch_size) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        items = [_to_fake_batch(v, mode, device, batch_size) for v in batch]
        return type(batch)(items) if not hasattr(batch, "_fields") else type(batch)(*items)
    return batch


def _has_padding(batch: Any) -> bool:
    """Whether an ``attention_mask`` of the example batch masks out any position."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, Tensor) and not mask.is_meta and bool((mask == 0).any()):
            return True
        return any(_has_padding(v) for v in batch.values() if isinstance(v, (Mapping, list, tuple)))
    if isinstance(batch, (list, tuple)):
        return any(_has_padding(v) for v in batch)
    return False


def _batch_size_of(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else []
    for value in values:
        size = _batch_size_of(value)
        if size:
            return size
    return 0


# ----------------------------------------------------------------------------------------------- counting


@dataclass
class _Saved:
    """One storage saved for backward; what 8-bit activations would keep of it, as the quantizer decides."""

    nbytes: int  # of the storage
    weight_copy: bool
    block: int | None
    quantized_bytes: int = 0  # 8-bit data + scales: the whole storage once, or each distinct partial view
    kept: bool = False  # some save keeps the storage as it is (small, integer or 8-bit tensors)
    whole: bool = False  # a save spanning the storage was quantized (later views reuse it)
    views: set = field(default_factory=set)


@dataclass
class _Forward:
    saved: dict[int, _Saved] = field(default_factory=dict)
    block_inputs: dict[int, tuple[int, int]] = field(default_factory=dict)  # storage key -> (bytes, elements)
    gradient_parts: dict[int, int] = field(default_factory=dict)  # id(parameter) -> graph edges into its gradient
    first_gradients: set[int] = field(default_factory=set)  # id(parameter) of the gradients backward makes first
    # what each part run under `recompute_in_backward` (a chunk of the chunked loss) saves: rebuilt in backward
    regions: list[dict[int, int]] = field(default_factory=list)

    @property
    def largest_activation(self) -> int:
        """Bytes of the largest saved activation (weight copies aside, rebuilt parts included).

        Backward's working gradients are of its size.
        """
        saved = max((s.nbytes for s in self.saved.values() if not s.weight_copy), default=0)
        return max([saved, *(max(region.values(), default=0) for region in self.regions)])

    @property
    def largest_region(self) -> int:
        """Bytes one rebuilt part saves (the largest): held while backward runs through it."""
        return max((sum(region.values()) for region in self.regions), default=0)


class _FusedAttention(torch.overrides.TorchFunctionMode):
    """Route ``scaled_dot_product_attention`` on fake tensors to the fused kernel a real run of the device picks.

    On fake (meta-backed) tensors PyTorch chooses the math path, which saves the attention matrix for backward;
    a real CPU step takes the fused flash kernel (when there is no dropout) and a GPU step flash or
    memory-efficient attention, which save only the inputs, the output and the log-sum-exp.
    """

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        call = {**dict(zip(names[: len(args)], args, strict=True)), **kwargs}
        query, key, value = call["query"], call["key"], call["value"]
        mask, dropout = call.get("attn_mask"), call.get("dropout_p", 0.0)
        causal, scale = call.get("is_causal", False), call.get("scale")
        heads = (query.shape[1], key.shape[1]) if query.dim() == 4 else (0, 0)
        same_heads = query.dim() == 4 and heads[0] == heads[1] == value.shape[1]
        grouped = query.dim() == 4 and call.get("enable_gqa", False) and heads[1] > 0 and heads[0] % heads[1] == 0
        plain = same_heads or grouped
        if self.device_type == "cpu" and plain and dropout == 0.0:
            return flash_attention_cpu(query, key, value, causal, mask, scale)
        if self.device_type == "cuda" and same_heads:
            if mask is not None and mask.dtype is torch.bool:
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, -math.inf)
            if mask is not None:
                mask = mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
            return efficient_attention(query, key, value, mask, dropout, causal, scale)
        return func(*args, **kwargs)


def _count_forward(
    module: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    stack: LayerStack | None,
    autocast: Any,
    group_size: int,
    min_numel: int,
    padded: bool = False,
) -> _Forward:
    """One fake forward; what autograd saves, by storage, which block was running, and its 8-bit size."""
    record = _Forward()
    params = {storage_id(p) for p in module.parameters()} | {storage_id(b) for b in module.buffers()}
    frozen_shapes = {p.shape for p in module.parameters() if not p.requires_grad and p.is_floating_point()}
    current: list[int | None] = [None]
    inputs: list[Tensor] = []
    handles = []
    if stack is not None:
        for index, block in enumerate(stack):

            def enter(
                _module: nn.Module, args: tuple, kwargs: dict, index: int = index, block: nn.Module = block
            ) -> None:
                current[0] = index
                hidden = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
                # a checkpointed block keeps its input only where autograd runs through it (not in a frozen prefix)
                through = hidden is not None and (
                    hidden.requires_grad or any(p.requires_grad for p in block.parameters())
                )
                if through and hidden.is_floating_point():
                    inputs.append(hidden)  # held, so that no later tensor's storage takes its identity
                    nbytes = hidden.untyped_storage().nbytes()
                    record.block_inputs.setdefault(storage_id(hidden), (nbytes, nbytes // hidden.element_size()))

            def leave(*_: Any) -> None:
                current[0] = None

            handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(block.register_forward_hook(leave, always_call=True))

    def pack(tensor: Tensor) -> Tensor:
        key = storage_id(tensor)
        if key in params:
            return tensor
        item = record.saved.get(key)
        if item is None:
            base = view_base(tensor)
            copy = tensor.is_floating_point() and (
                _derives_from_leaf(tensor)
                or (base.grad_fn is None and not base.requires_grad and base.shape in frozen_shapes)
            )
            item = record.saved[key] = _Saved(tensor.untyped_storage().nbytes(), bool(copy), current[0])
        # what ActivationQuantizer.pack does with this save
        numel = tensor.numel()
        if not tensor.is_floating_point() or tensor.element_size() < 2 or numel < max(1, min_numel):
            item.kept = True
        elif numel * tensor.element_size() == item.nbytes:
            if not item.whole:
                item.whole = True
                item.quantized_bytes += _quantized_bytes(numel, group_size)
        elif not item.whole:
            geometry = (tuple(tensor.shape), tensor.stride(), tensor.storage_offset())
            if geometry not in item.views:
                item.views.add(geometry)
                item.quantized_bytes += _quantized_bytes(numel, group_size)
        return tensor

    from lightning_peft.modules import _chunked_loss

    def rebuilt_in_backward(function: Callable[..., Tensor], *args: Any) -> Tensor:
        # the checkpoint keeps its inputs; what the part saves exists again only while backward runs through it
        for arg in args:
            if isinstance(arg, Tensor):
                pack(arg)
        region: dict[int, int] = {}

        def pack_region(tensor: Tensor) -> Tensor:
            if storage_id(tensor) not in params:
                region.setdefault(storage_id(tensor), tensor.untyped_storage().nbytes())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack_region, lambda t: t):
            out = function(*args)
        record.regions.append(region)
        return out

    recompute = _chunked_loss.recompute_in_backward
    _chunked_loss.recompute_in_backward = rebuilt_in_backward
    try:
        device_type = next((p.device.type for p in module.parameters()), "cpu")
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            autocast,
            _FusedAttention(device_type),
            hf_masks_as_in_a_real_run(padded),
        ):
            loss = loss_fn(module, batch)
        record.gradient_parts, record.first_gradients = _gradient_parts(loss)
    finally:
        _chunked_loss.recompute_in_backward = recompute
        for handle in handles:
            handle.remove()
    return record


def _gradient_parts(loss: Any) -> tuple[dict[int, int], set[int]]:
    """How many partial gradients backward makes for each parameter, and which parameters' come first.

    The parts are the graph's edges into a parameter's ``AccumulateGrad``. A weight used twice in the forward (tied
    input embedding and LM head) gets two, which autograd holds until it sums them: the first arrives at the start
    of backward (the head), the second at its end (the embedding). The first gradients are those of the parameters
    nearest the loss (fewest graph nodes between: the head's), made while every activation is still held.
    """
    parts: dict[int, int] = {}
    first: set[int] = set()
    root = getattr(loss, "grad_fn", None)
    seen: set = set()
    level = [root] if root is not None else []
    while level:  # breadth first: the level where a parameter first appears is the start of backward
        following, reached = [], set()
        for node in level:
            if node in seen:
                continue
            seen.add(node)
            for child, _ in node.next_functions:
                if child is None:
                    continue
                variable = getattr(child, "variable", None)
                if variable is not None:
                    parts[id(variable)] = parts.get(id(variable), 0) + 1
                    reached.add(id(variable))
                else:
                    following.append(child)
        if not first:
            first = reached
        level = following
    return parts, first


def _quantized_bytes(numel: int, group_size: int) -> int:
    groups = -(-numel // group_size)
    return groups * group_size + 4 * groups


def _activation_bytes(
    record: _Forward, quantized: bool, checkpointing: bool, group_size: int, min_numel: int
) -> tuple[int, int, int]:
    """(saved bytes, of which weight copies, recomputed block) of one forward under the variant."""

    def size(item: _Saved) -> int:
        if not quantized:
            return item.nbytes
        if item.weight_copy:
            return 0  # recast from the parameter in backward
        return item.quantized_bytes + (item.nbytes if item.kept else 0)

    def total(items: Iterable[_Saved]) -> tuple[int, int]:
        items = list(items)
        return sum(size(s) for s in items), sum(size(s) for s in items if s.weight_copy)

    if not checkpointing:
        return (*total(record.saved.values()), record.largest_region)
    # checkpointed blocks keep their inputs (through the same hooks: quantized with 8-bit activations); in
    # backward, one block's saved tensors exist at a time
    outside, outside_copies = total(s for s in record.saved.values() if s.block is None)
    inputs = sum(
        _quantized_bytes(numel, group_size) if quantized and numel >= max(1, min_numel) else nbytes
        for nbytes, numel in record.block_inputs.values()
    )
    blocks = {s.block for s in record.saved.values() if s.block is not None}
    per_block = [total(s for s in record.saved.values() if s.block == b) for b in blocks]
    largest, largest_copies = max(per_block, default=(0, 0))
    return outside + inputs, outside_copies, max(largest, record.largest_region)


def _optimizer_bytes(trainable: list[Tensor], eight_bit: bool, min_8bit_size: int) -> int:
    total = 0
    maps = False
    for param in trainable:
        numel = param.numel()
        if eight_bit and numel >= min_8bit_size:
            total += 2 * numel + 2 * 4 * -(-numel // _BNB_BLOCK)
            maps = True
        elif eight_bit:
            total += 2 * 4 * numel
        else:
            total += 2 * numel * param.element_size() + 4  # exp_avg, exp_avg_sq, step
    return total + (2 * 256 * 4 if maps else 0)


def _gradient_bytes(
    trainable: list[Tensor], in_backward: bool, accumulate_grad_batches: int, parts: Mapping[int, int]
) -> int:
    """Gradient bytes at the end of backward: all, or with the step in backward (no accumulation) the largest.

    A weight used twice in the forward (a tied embedding and head) gets its partial gradients summed into a new
    tensor while they are held: at that moment its gradient exists ``parts + 1`` times (3 for a tied embedding, as
    measured), on top of the earlier micro-batches' ``.grad`` with accumulation. ``OptimizerInBackward`` steps and
    frees each gradient as soon as it is complete, so one gradient at a time is held: the largest (a tied weight's
    ``parts + 1`` copies). With ``accumulate_grad_batches > 1`` every gradient is held from one micro-batch to the
    next, so all count.
    """
    unique = {id(p): p for p in trainable}

    def copies(key: int) -> int:
        return parts[key] + 1 if parts.get(key, 1) > 1 else 1

    if not in_backward or accumulate_grad_batches > 1:
        held = 0 if accumulate_grad_batches > 1 else 1  # without accumulation the sum itself becomes `.grad`
        extra = sum((copies(key) - held) * p.numel() * p.element_size() for key, p in unique.items() if copies(key) > 1)
        return _unique_bytes(trainable) + extra
    return max((copies(key) * p.numel() * p.element_size() for key, p in unique.items()), default=0)


def _first_gradient_bytes(trainable: list[Tensor], first: set[int]) -> int:
    """Bytes of the gradients backward makes first (:func:`_gradient_parts`), held beside every activation."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in trainable}.values() if id(p) in first)


def variant_parts(variant: str) -> list[str]:
    """The parts of a variant's name.

    Example::

        >>> variant_parts("int8_act+in_backward")
        ['int8_act', 'in_backward']
    """
    return [part for part in variant.split("+") if part]


def _unique_bytes(tensors: Iterable[Tensor]) -> int:
    seen: dict[int, int] = {}
    for tensor in tensors:
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def _default_loss(module: nn.Module, batch: Any) -> Tensor:
    compute_loss = getattr(module, "compute_loss", None)
    if callable(compute_loss):
        return compute_loss(batch)
    output = module.training_step(batch, 0)
    return output["loss"] if isinstance(output, Mapping) else output


def estimate_memory(
    factory: Callable[[], nn.Module],
    batch: Any,
    precision: str = "32-true",
    methods: Iterable[str | Method] | None = None,
    variants: Iterable[str] | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    activations: str | Method = "activation_quantization",
    min_8bit_size: int = 4096,
    configured: bool = False,
    device: str = "cpu",
    accumulate_grad_batches: int = 1,
    choices: bool = True,
) -> MemoryReport:
    """Estimate the training memory of every method for the model ``factory`` builds, without its weights.

    Args:
        factory: builds the model (a LightningModule or any ``nn.Module``); called on the ``meta`` device once
            per method, with Hugging Face ``from_pretrained`` reading only the config.
        batch: an example batch (tensors, or dicts / tuples of them): only shapes and dtypes are used. Its first
            dimension is the batch size.
        precision: Lightning precision: ``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``, ``"bf16-true"``,
            ``"16-true"``.
        methods: methods whose ``estimate`` is ``"trainable"`` (default: every registered one,
            :func:`estimated_methods`), by name (with the registry's settings) or as
            :class:`~lightning_peft.methods.Method` objects with their own settings
            (``get_method("lisa").configure(n_layers=4)``, ``get_method("lora").configure(r=8)``). Each is asked
            what it trains (:meth:`Method.apply <lightning_peft.methods.Method.apply>`) on the model built on the
            ``meta`` device.
        variants: among :data:`VARIANTS` (``""`` is the method with AdamW and nothing else). Default: every
            variant that can run with ``precision`` on ``device`` (the optimizer step in backward cannot run with
            the gradient scaler of ``"16-mixed"`` on CUDA).
        loss_fn: ``loss_fn(model, batch)`` returns the loss; default: ``model.compute_loss(batch)`` where it
            exists, else ``model.training_step(batch, 0)``.
        activations: the method of the ``int8_act`` variants (its ``estimate`` is ``"activations"``): its
            ``group_size`` and ``min_numel`` settings (tensors with fewer elements stay unquantized) are used, e.g.
            ``get_method("activation_quantization").configure(min_numel=512)``.
        min_8bit_size: AdamW8bit keeps 32-bit state for parameters with fewer elements.
        configured: add a row for the model's trainable set as built (e.g. a module that applies LoRA itself).
        device: the device the fake tensors claim (``"cpu"`` or ``"cuda"``; autocast follows it). Nothing runs
            there.
        choices: also make rows for each method's :attr:`~lightning_peft.methods.Method.choices` (LISA with frozen
            embeddings, and with frozen embeddings and head), named ``f"{method}_{suffix}"``.
        accumulate_grad_batches: the Trainer's gradient accumulation. Above 1, the ``in_backward`` rows hold every
            gradient (from one micro-batch to the next), as the rows without it do.

    Returns:
        The :class:`MemoryReport`.

    Raises:
        ValueError: for a method that is not registered or not estimated, an unknown variant or precision, an
            ``in_backward`` variant with ``"16-mixed"`` on CUDA, ``accumulate_grad_batches`` below 1, or a batch
            without a batch dimension.

    Example::

        >>> model = lambda: nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10))
        >>> batch = torch.randn(32, 64)
        >>> report = estimate_memory(model, batch, methods=["full"], variants=[""],
        ...                          loss_fn=lambda m, x: m(x).square().mean())
        >>> report.row("full").params
        76840
    """
    scaler = precision == "16-mixed" and torch.device(device).type == "cuda"
    if variants is None:
        variants = [v for v in VARIANTS if not (scaler and "in_backward" in variant_parts(v))]
    variants = list(variants)
    known = estimated_methods()
    chosen: list[Method] = []
    for method in known if methods is None else methods:
        name = method.name if isinstance(method, Method) else method
        if name not in known and not (isinstance(method, Method) and method.estimate == "trainable"):
            raise ValueError(
                f"`methods` must be among {', '.join(known)}, got {name!r}. HINT: e.g. methods=['full', 'lisa'], or"
                " register your own method with lightning_peft.methods.register_method."
            )
        chosen.append(get_method(method))
    if choices:
        chosen += [alternative for method in chosen for alternative in method.alternatives()]
    activation_method = get_method(activations)
    if activation_method.estimate != "activations":
        raise ValueError(
            f"`activations` must be a method whose `estimate` is 'activations', got {activation_method.name!r}."
            " HINT: leave it as 'activation_quantization', configured with its group_size and min_numel."
        )
    activation_group_size = int(activation_method.settings["group_size"])
    activation_min_numel = int(activation_method.settings["min_numel"])
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(
                f"`variants` must be among {', '.join(repr(v) for v in VARIANTS)}, got {variant!r}."
                " HINT: '' is the method alone; a combination names its parts in the order"
                f" {'+'.join(VARIANT_PARTS)}."
            )
        if scaler and "in_backward" in variant_parts(variant):
            raise ValueError(
                f"`variants` has {variant!r}, but the optimizer step in backward cannot run with `precision="
                "'16-mixed'` on CUDA: the gradient scaler checks every gradient before the step. HINT: estimate"
                " precision='bf16-mixed', or leave the 'in_backward' variants out."
            )
    if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
        raise ValueError(
            f"`accumulate_grad_batches` must be an integer of at least 1, got {accumulate_grad_batches!r}."
            " HINT: the Trainer's `accumulate_grad_batches` (1: no accumulation)."
        )
    if precision not in _PRECISIONS:
        raise ValueError(
            f"`precision` must be one of {', '.join(_PRECISIONS)}, got {precision!r}."
            " HINT: 'bf16-mixed' is what most GPU runs use."
        )
    batch_size = _batch_size_of(batch)
    if batch_size < 1:
        raise ValueError("`batch` has no tensor with a batch dimension. HINT: pass one real (or zero) batch.")
    loss_fn = loss_fn or _default_loss
    notes: list[str] = []
    if accumulate_grad_batches > 1 and any("in_backward" in variant_parts(v) for v in variants):
        notes.append(
            f"accumulate_grad_batches={accumulate_grad_batches}: with the optimizer step in backward every gradient"
            " is still held between micro-batches, so its rows count all gradients"
        )
    padded = _has_padding(batch)
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        # CUDA autocast cannot run without a GPU: CPU autocast and CPU attention kernels stand in (close: both cast
        # the same matrix products, and the fused kernels of both save inputs, output and log-sum-exp)
        target = torch.device("cpu")
        notes.append("estimated for CUDA on a machine without a GPU: CPU autocast and attention kernels stand in")
    param_dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision)
    autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    rows: list[MemoryEstimate] = []
    model_name = "model"
    by_name = {m.name: m for m in chosen}
    titles = {m.name: m.label for m in chosen}
    plan = [(_CONFIGURED, v) for v in variants] if configured else []
    plan += [(m, v) for m in by_name for v in variants]
    records: dict[str, tuple[nn.Module, _Forward, _Forward]] = {}
    for method in dict.fromkeys(m for m, _ in plan):
        module = build_on_meta(factory)
        model_name = type(module).__name__
        if param_dtype is not None:
            module.to(param_dtype)
        try:
            stack = find_blocks(module)
        except ValueError:
            stack = None
        try:
            if method != _CONFIGURED:
                by_name[method].apply(module)  # the method itself says what trains (and LoRA adds its adapters)
        except Exception as error:  # noqa: BLE001 - a method that does not apply is reported, not fatal
            notes.append(f"{titles.get(method) or _method_label(method)} left out: {type(error).__name__}: {error}")
            continue
        module.train()
        forwards = []
        for size in (batch_size, 2 * batch_size):
            mode = fake_tensor_mode(allow_non_fake_inputs=True)
            _fake_module(module, mode, target)
            fake_batch = _to_fake_batch(batch, mode, target, size)
            autocast = (
                torch.autocast(target.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with mode:
                forwards.append(
                    _count_forward(
                        module,
                        loss_fn,
                        fake_batch,
                        stack,
                        autocast,
                        activation_group_size,
                        activation_min_numel,
                        padded,
                    )
                )
        records[method] = (module, *forwards)
    for method, variant in plan:
        if method not in records:
            continue
        module, first, second = records[method]
        params = list(dict.fromkeys(module.parameters()))
        trainable = [p for p in params if p.requires_grad]
        parts = variant_parts(variant)
        quantized = "int8_act" in parts
        checkpointing = "checkpointing" in parts
        settings = (quantized, checkpointing, activation_group_size, activation_min_numel)
        saved, copies, recomputed = _activation_bytes(first, *settings)
        saved2, _, recomputed2 = _activation_bytes(second, *settings)
        rows.append(
            MemoryEstimate(
                method=method + (f"+{variant}" if variant else ""),
                params=_unique_bytes(params),
                # the module holds the parameters of the second forward, whose graph `second` counted
                grads=_gradient_bytes(
                    trainable, "in_backward" in parts, accumulate_grad_batches, second.gradient_parts
                ),
                optimizer_state=_optimizer_bytes(trainable, "adamw8bit" in parts, min_8bit_size),
                working=2 * first.largest_activation,
                first_grads=_first_gradient_bytes(trainable, second.first_gradients),
                saved_activations=saved,
                weight_copies=copies,
                trainable_params=sum(p.numel() for p in trainable),
                total_params=sum(p.numel() for p in params),
                activation_bytes_per_sample=(saved2 + recomputed2 - saved - recomputed) / batch_size,
                batch_size=batch_size,
                recomputed=recomputed,
                title=titles.get(method, ""),
            )
        )
    return MemoryReport(model_name, batch_size, precision, rows, notes)


def with_batch_size(report: MemoryReport, batch_size: int) -> MemoryReport:
    """The report scaled to another batch size (saved activations grow linearly with it).

    Example::

        >>> report = MemoryReport("M", 2, "32-true", [MemoryEstimate("full", 4, 4, 8, 16, 0, 1, 1, 8.0, 2)])
        >>> with_batch_size(report, 4).rows[0].saved_activations
        32
    """
    rows = [
        replace(
            row,
            saved_activations=int(
                row.saved_activations + row.activation_bytes_per_sample * (batch_size - row.batch_size)
            ),
            working=int(row.working * batch_size / max(1, row.batch_size)),
            batch_size=batch_size,
        )
        for row in report.rows
    ]
    return replace(report, rows=rows, batch_size=batch_size)
