"""What the benchmark scripts share: byte counters, the measuring callback, the environment and the result writers.

Memory is counted, not sampled: unique storage bytes of the parameters, of the gradients (taken in
``on_before_optimizer_step``), of the optimizer state (:func:`optimizer_state_tensors`) and of the tensors autograd
saves for backward (:class:`SavedTensorCounter`, parameters excluded). :class:`MeasuringCallback` records them
through a Lightning fit, with the step times and the trainable-set controller's cost at each optimizer-step
boundary (``TrainableSetController.last_boundary``). :class:`ProcessMemory` gives the process's peak resident size
as an indication, :func:`environment` what the numbers were measured on, :func:`write_results` the JSON and markdown
files.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_peft.layout import find_blocks
from lightning_peft.trainable import BoundaryTiming, TrainableSetController

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# ----------------------------------------------------------------------------------------------- memory counting


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a storage viewed by several tensors counts once)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[Tensor]:
    """Tensors of the optimizer's state, also those held by objects in it (GaLore's projection matrices) and, for
    BAdam, its base optimizer's state and the float32 copy of the active block it updates."""
    base = getattr(optimizer, "base_optimizer", None)
    if base is not None:
        yield from getattr(optimizer, "param_idx2hp", {}).values()
        optimizer = base
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                yield value
            elif hasattr(value, "__dict__"):
                yield from (v for v in vars(value).values() if isinstance(v, Tensor))


class SavedTensorCounter:
    """Pack/unpack hooks that record the storages autograd saves for backward, parameters excluded.

    ``inner``: saved-tensor hooks to pass the tensors on to (``save_on_cpu``'s): only the innermost hooks see the
    saved tensors, so a counter that should not change what the step does has to call the ones it shadows.
    """

    def __init__(
        self, excluded_storages: set[int], inner: torch.autograd.graph.saved_tensors_hooks | None = None
    ) -> None:
        self.excluded = excluded_storages
        self.storages: dict[int, int] = {}
        self.inner = inner

    def pack(self, tensor: Tensor) -> Any:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self.excluded:
            self.storages[pointer] = storage.nbytes()
        return tensor if self.inner is None else self.inner.pack_hook(tensor)

    def unpack(self, packed: Any) -> Tensor:
        return packed if self.inner is None else self.inner.unpack_hook(packed)

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The context in which autograd calls :meth:`pack` and :meth:`unpack`."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


class ProcessMemory:
    """Peak resident set size of this process since :meth:`reset` (Linux ``clear_refs``; None where unavailable)."""

    def __init__(self) -> None:
        self.baseline: int | None = None

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def reset(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the baseline is what is in use
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets VmHWM to the current RSS
        except OSError:
            self.baseline = None
            return
        self.baseline = self._status("VmRSS")

    def peak_delta(self) -> int | None:
        peak = self._status("VmHWM")
        return None if peak is None or self.baseline is None else peak - self.baseline


# ----------------------------------------------------------------------------------------------------- measuring


class MeasuringCallback(Callback):
    """Memory components, step times and the trainable-set controller's cost of every training step of a fit.

    Recorded in :attr:`results`: ``param_bytes`` and ``total_params`` (at the start), ``grad_bytes`` and
    ``trainable_params`` (elements that received a gradient; max over steps), ``saved_activation_bytes`` (tensors
    saved for backward during a forward, parameters excluded) and ``optimizer_state_bytes``; :attr:`step_seconds`
    holds the wall time of each step (``on_train_batch_start`` to ``on_train_batch_end``, CUDA-synchronised),
    :attr:`boundaries` the controller's :class:`~lightning_peft.trainable.BoundaryTiming` of each optimizer step.

    Two ways to measure:

    * ``timed=None`` (default): saved tensors and optimizer state on every step, max over steps; the fit runs to
      its own end.
    * ``timed=N``: a benchmark schedule. Saved tensors are counted on the first (warm-up) step only, so that the
      counting hooks cost no timed step; ``warmup`` steps (and, with ``cover_blocks``, until every block has
      optimizer state, at most ``max_coverage_steps`` more) are not timed; after ``N`` timed steps the optimizer
      state, the blocks with state and the CUDA peaks are recorded and training stops.

    Args:
        warmup: steps before timing (with ``timed``).
        timed: number of timed steps, or None to measure every step of the fit.
        cover_blocks: extend the warm-up until every block has optimizer state.
        max_coverage_steps: cap on those extra warm-up steps.
        quantization: the run's ``ActivationQuantization`` callback, if any: the saved bytes are then the ones it
            keeps (its ``last_stats`` of the first step), since a counter's hooks, entered around it, would see
            nothing, and entered inside it, would shadow it.
        offload: keep the saved tensors in CPU memory (``torch.autograd.graph.save_on_cpu``). Applied here because
            only the innermost saved-tensor hooks see the tensors: on a counted step the counter passes them on to
            ``save_on_cpu`` and counts what is offloaded.
    """

    def __init__(
        self,
        warmup: int = 0,
        timed: int | None = None,
        cover_blocks: bool = False,
        max_coverage_steps: int = 0,
        quantization: Any = None,
        offload: bool = False,
    ) -> None:
        self.warmup = warmup
        self.timed = timed
        self.cover_blocks = cover_blocks
        self.max_coverage_steps = max_coverage_steps
        self.quantization = quantization
        self.offload = offload
        self.cuda = False
        self.step = 0
        self.timed_from: int | None = None
        self.step_seconds: list[float] = []  # every step
        self.timed_seconds: list[float] = []  # the timed steps (``timed``)
        self.boundaries: list[BoundaryTiming] = []
        self.block_params: list[list[nn.Parameter]] = []
        self.parameter_storages: set[int] = set()
        self.results: dict[str, Any] = {
            "grad_bytes": 0,
            "optimizer_state_bytes": 0,
            "saved_activation_bytes": 0,
            "trainable_params": 0,
        }
        self._controller: TrainableSetController | None = None
        self._counter: SavedTensorCounter | None = None
        self._hooks: contextlib.AbstractContextManager | None = None
        self._start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.cuda = pl_module.device.type == "cuda"
        params = list(pl_module.parameters())
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in params}
        self.results["param_bytes"] = storage_bytes(params)
        self.results["total_params"] = sum(p.numel() for p in params)
        self._controller = next((cb for cb in trainer.callbacks if isinstance(cb, TrainableSetController)), None)
        if self.timed is not None:
            stack = find_blocks(pl_module)
            named = dict(pl_module.named_parameters())
            # A block "has state" when every parameter of it that may train (LoRA: its adapters) has state.
            self.block_params = [
                [named[n] for n in stack.block_parameter_names(i) if named[n].requires_grad] for i in range(len(stack))
            ]
        if self.cuda:
            torch.cuda.synchronize()
            self.results["gpu_allocated_at_start_bytes"] = torch.cuda.memory_allocated()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        inner = torch.autograd.graph.save_on_cpu(pin_memory=self.cuda) if self.offload else None
        counted = self.timed is None or self.step == 0
        if counted and self.quantization is None:
            self._counter = SavedTensorCounter(self.parameter_storages, inner)
            self._hooks = self._counter.hooks()
        else:
            self._hooks = inner
        if self._hooks is not None:
            self._hooks.__enter__()
        if self.cuda:
            torch.cuda.synchronize()
            if self.step == self.timed_from:
                self.results["gpu_peak_warmup_bytes"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._leave_hooks()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        with_grad = [p for p in pl_module.parameters() if p.grad is not None]
        # BAdam moves the active block's gradients onto its float32 copies before the base optimizer runs
        with_grad += [p for p in getattr(optimizer, "param_idx2hp", {}).values() if p.grad is not None]
        self.results["grad_bytes"] = max(self.results["grad_bytes"], storage_bytes(p.grad for p in with_grad))
        self.results["trainable_params"] = max(self.results["trainable_params"], sum(p.numel() for p in with_grad))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._start
        self._leave_hooks()  # a step without backward (the loss was None) leaves them here
        self.step_seconds.append(elapsed)
        if self._counter is not None:
            saved = max(self.results["saved_activation_bytes"], self._counter.nbytes)
            self.results["saved_activation_bytes"] = saved
            self._counter = None
        if self.quantization is not None and (self.timed is None or self.step == 0):
            # complete once the forward is done (the callback leaves its hooks in ``on_before_backward``)
            stats = self.quantization.last_stats
            saved = max(self.results["saved_activation_bytes"], stats.bytes_after)
            self.results["saved_activation_bytes"] = saved
            self.results["quantization"] = asdict(stats)
        boundary = self._controller.last_boundary if self._controller is not None else None
        if boundary is not None and (not self.boundaries or boundary is not self.boundaries[-1]):
            self.boundaries.append(boundary)  # one per optimizer step: the batches of a window share it
        self.step += 1
        optimizer = trainer.optimizers[0]
        if self.timed is None:
            state = storage_bytes(optimizer_state_tensors(optimizer))
            self.results["optimizer_state_bytes"] = max(self.results["optimizer_state_bytes"], state)
            return
        if self.timed_from is not None and self.step > self.timed_from:
            self.timed_seconds.append(elapsed)
        if self.timed_from is None and self.step >= self.warmup:
            covered = self._blocks_with_state(optimizer) == len(self.block_params)
            if covered or not self.cover_blocks or self.step >= self.warmup + self.max_coverage_steps:
                self.timed_from = self.step
                self.results["warmup_steps"] = self.step
        if len(self.timed_seconds) == self.timed:
            self.results["optimizer_state_bytes"] = storage_bytes(optimizer_state_tensors(optimizer))
            self.results["blocks_with_state"] = self._blocks_with_state(optimizer)
            self.results["n_blocks"] = len(self.block_params)
            if self.cuda:
                self.results["gpu_peak_timed_bytes"] = torch.cuda.max_memory_allocated()
            trainer.should_stop = True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._leave_hooks()

    def _leave_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    def _blocks_with_state(self, optimizer: torch.optim.Optimizer) -> int:
        return sum(all(p in optimizer.state for p in block) for block in self.block_params)

    def memory_components(self) -> dict[str, int]:
        """Parameters, gradients, optimizer state and saved tensors (bytes), as recorded."""
        keys = ("param_bytes", "grad_bytes", "optimizer_state_bytes", "saved_activation_bytes")
        return {key: self.results[key] for key in keys}


def quiet_cpu_trainer(root: str, callbacks: list, **limits: Any) -> pl.Trainer:
    """A one-device CPU Trainer without logger, checkpoints, progress bar or model summary.

    ``limits`` are the run's length (``max_epochs``, ``limit_train_batches``, ``num_sanity_val_steps``, ...).
    """
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
        **limits,
    )


# --------------------------------------------------------------------------------------------------- environment


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    """Installed version of a distribution, from its metadata (importing some, e.g. bitsandbytes, is slow)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(
    device: torch.device | None = None,
    packages: Iterable[str] = (),
    load_average: bool = True,
    cuda_version: bool = False,
    commit: bool = False,
) -> dict[str, Any]:
    """What a run was measured on: date, device (GPU or CPU name), CPU count, load average (other jobs on the
    machine inflate wall times), torch threads, versions of Python, torch, lightning and ``packages``."""
    gpu = device is not None and torch.device(device).type == "cuda"
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if gpu else cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    if load_average:
        env["load_average_1min"] = round(os.getloadavg()[0], 1)
    env |= {"torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}
    if cuda_version:
        env["cuda"] = torch.version.cuda
    env["lightning"] = pl.__version__
    env |= {name: package_version(name) for name in packages}
    if commit:
        env["git_commit"] = git_commit()
    return env


# ------------------------------------------------------------------------------------------------------- models


def llama_config(size: dict[str, Any], positions: int, **overrides: Any) -> Any:
    """A transformers ``LlamaConfig`` of a benchmark's size dict, ``positions`` long, with SDPA attention.

    The dict names ``hidden``, ``layers``, ``heads``, ``kv_heads``, ``intermediate`` and ``vocab``; ``overrides`` go
    to the config as they are.
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=size["hidden"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        intermediate_size=size["intermediate"],
        vocab_size=size["vocab"],
        max_position_embeddings=positions,
        attn_implementation="sdpa",
        **overrides,
    )


# ------------------------------------------------------------------------------------------------------- writing


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Indented JSON with a final newline (values JSON does not know, such as paths, as strings)."""
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_markdown(path: str | os.PathLike, text: str) -> None:
    """The markdown, ending in exactly one newline."""
    Path(path).write_text(text.rstrip("\n") + "\n")


def write_results(
    out_dir: str | os.PathLike, stem: str, results: Any, render: Callable[[Any], str] | None = None
) -> Path:
    """Write ``<stem>.json`` and, with ``render``, ``<stem>.md`` into ``out_dir`` (created); return the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", results)
    if render is not None:
        write_markdown(out / f"{stem}.md", render(results))
    return out / f"{stem}.json"
