"""The trainable-set controller: the one place that changes which parameters train.

Method callbacks (LISA, Half Fine-Tuning, IST, ...) subclass :class:`TrainableSetCallback` and say which
parameters they allow to train; they never flip ``requires_grad`` themselves. A single
:class:`TrainableSetController`, added to the Trainer by the first such callback, combines the wishes (a
parameter trains only if every callback allows it) and applies them at optimizer-step boundaries, so a mask never
changes in the middle of gradient accumulation. It owns what changing the trainable set implies:

* the optimizer state of a parameter that stops training is released (``optimizer.state.pop``) and its ``.grad``
  set to ``None`` -- this is where LISA's memory saving comes from;
* a parameter that starts training again starts with fresh optimizer state;
* param groups are never edited, so LR schedulers keep working; the optimizer is built by the user's
  ``configure_optimizers`` over every candidate parameter (freezing happens afterwards, at train start), so
  parameters sampled later are really updated;
* under DDP every rank uses the same seed (:func:`agree_seed`), DDP is told that some parameters go unused
  (``find_unused_parameters=True``), and nothing is frozen before DDP wraps the model, so no parameter is ever
  left out of gradient synchronisation;
* under FSDP2 (``ModelParallelStrategy``), whose distributed checkpoint expects optimizer state for every
  parameter that requires grad, the parameters without saved state stay frozen while a checkpoint loads;
* at every optimizer-step boundary it first calls :meth:`TrainableSetCallback.on_step_boundary` of every method,
  then asks each for its trainable set, so no method depends on the order of ``trainer.callbacks``;
* at the end of ``fit`` the parameters it froze are trainable again, as the user gave them.

Candidates are the parameters with ``requires_grad=True`` when training starts: what the user's module froze
(e.g. a peft base model) stays frozen and is never touched.
"""

from __future__ import annotations

import os
import time
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_peft._compat import ddp_constructor_kwargs, logger_writes_this_step, run_before_checkpoint_load
from lightning_peft._sharding import check_optimizers

__all__ = ["BoundaryTiming", "TrainableSetCallback", "TrainableSetController", "agree_seed"]


def agree_seed(trainer: pl.Trainer, seed: int | None) -> int:
    """Return a seed that every rank agrees on.

    Without an explicit ``seed`` it derives one from ``seed_everything`` (``PL_GLOBAL_SEED``) when the user called
    it, so seeded runs stay reproducible, else from the operating system. Either way rank 0's value is broadcast,
    so all ranks sample the same layers.
    """
    if seed is None:
        env = os.environ.get("PL_GLOBAL_SEED")
        seed = int(env) if env is not None else int.from_bytes(os.urandom(4), "little") >> 1
    return int(trainer.strategy.broadcast(seed, src=0))


class TrainableSetCallback(Callback):
    """Base class of callbacks that decide which parameters train.

    A subclass implements :meth:`trainable_parameters`; the controller calls it at every optimizer-step boundary
    and intersects the answers of all such callbacks. Subclasses that override ``setup`` must call
    ``super().setup(...)``, which attaches the controller.

    Args:
        release_optimizer_state: release the optimizer state of parameters this callback freezes. If any
            attached callback asks for it, the controller releases.

    Example::

        >>> class TrainOnlyBiases(TrainableSetCallback):
        ...     def trainable_parameters(self, trainer, pl_module, step):
        ...         if not hasattr(self, "_biases"):
        ...             self._biases = frozenset(n for n, _ in pl_module.named_parameters() if n.endswith("bias"))
        ...         return self._biases
    """

    def __init__(self, release_optimizer_state: bool = True) -> None:
        self.release_optimizer_state = release_optimizer_state
        self.controller: TrainableSetController | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.controller = TrainableSetController.attach(trainer, self)

    def on_step_boundary(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, step: int
    ) -> None:
        """Work the step's trainable set depends on (IST's importance update), before any method is asked for it.

        The controller calls this once per optimizer step, for every participant, before it calls any
        :meth:`trainable_parameters`, whatever the order of ``trainer.callbacks``. Default: nothing.
        """

    def trainable_parameters(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> Set[str] | None:
        """Names of the parameters (as in ``pl_module.named_parameters()``) this callback lets train at ``step``.

        Called once per optimizer step, before the first batch of that step. Return ``None`` for "no
        restriction". Return the *same object* while nothing changes: the controller skips all work when every
        callback returns what it returned last time, which keeps its cost per step in microseconds.
        """
        raise NotImplementedError


@dataclass
class BoundaryTiming:
    """What the controller's last optimizer-step boundary cost: :attr:`TrainableSetController.last_boundary`.

    Attributes:
        step: the optimizer step of the boundary.
        total_ns: wall time of the whole boundary (methods' ``on_step_boundary``, their sets, applying, logging).
        logging_ns: the part spent in ``pl_module.log`` of ``trainable_params``.
        changed: whether any method's set changed (only then are ``requires_grad`` flags and state touched).
    """

    step: int
    total_ns: int
    logging_ns: int
    changed: bool


class TrainableSetController(Callback):
    """Applies the combined trainable set of all :class:`TrainableSetCallback` s at optimizer-step boundaries.

    Added automatically by the first such callback (one controller per Trainer); users do not create it. It logs
    ``trainable_params`` (the number of parameter elements that train) whenever it changes and on every step the
    loggers write.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_peft.callbacks import LISA
        >>> trainer = pl.Trainer(callbacks=[LISA(n_layers=1)], logger=False)  # the controller joins at setup
    """

    def __init__(self) -> None:
        self.participants: list[TrainableSetCallback] = []
        self.candidates: dict[str, nn.Parameter] = {}
        self.num_trainable = 0
        self._last_step: int | None = None
        self._last_wishes: list[Set[str] | None] | None = None
        self._held_for_loading: list[nn.Parameter] = []
        #: Cost of the most recent optimizer-step boundary (``None`` before the first); benchmarks read it after
        #: each batch to time the controller without wrapping its hooks.
        self.last_boundary: BoundaryTiming | None = None

    @property
    def release_optimizer_state(self) -> bool:
        """Whether state of parameters that stop training is released (any participant asking is enough)."""
        return any(p.release_optimizer_state for p in self.participants)

    @classmethod
    def of(cls, trainer: pl.Trainer) -> TrainableSetController | None:
        """The Trainer's controller, or ``None`` when no method that changes the trainable set is attached."""
        return next((cb for cb in trainer.callbacks if isinstance(cb, cls)), None)

    @classmethod
    def attach(cls, trainer: pl.Trainer, participant: TrainableSetCallback) -> TrainableSetController:
        """Return the Trainer's controller (creating and adding it if needed) with ``participant`` registered."""
        controller = cls.of(trainer)
        if controller is None:
            _check_strategy(trainer, participant)
            controller = cls()
            trainer.callbacks.append(controller)
            if isinstance(trainer.strategy, ModelParallelStrategy):
                controller._wrap_checkpoint_loading(trainer.strategy)
        if participant not in controller.participants:
            controller.participants.append(participant)
        return controller

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        with_state = {id(p) for optimizer in trainer.optimizers for p in optimizer.state}
        checkpoint[_CHECKPOINT_KEY] = {
            "with_optimizer_state": sorted(n for n, p in pl_module.named_parameters() if id(p) in with_state)
        }

    def _hold_for_loading(self, pl_module: pl.LightningModule, ckpt_path: Any, weights_only: bool | None) -> None:
        # FSDP2's distributed checkpoint loads optimizer state into a template with an entry for every parameter
        # that requires grad, and fails on the parameters whose state was released when they froze: keep those out
        # of the template until training starts
        with_state = _names_with_optimizer_state(ckpt_path, weights_only) if ckpt_path else None
        if with_state is None:
            return
        for name, param in pl_module.named_parameters():
            if param.requires_grad and name not in with_state:
                param.requires_grad_(False)
                self._held_for_loading.append(param)

    def _wrap_checkpoint_loading(self, strategy: ModelParallelStrategy) -> None:
        # Lightning has no hook between building the optimizers and loading a checkpoint into them under FSDP2
        def hold(checkpoint_path: Any, *args: Any, **kwargs: Any) -> None:
            if strategy.lightning_module is not None:
                weights_only = kwargs.get("weights_only", args[0] if args else None)
                self._hold_for_loading(strategy.lightning_module, checkpoint_path, weights_only)

        run_before_checkpoint_load(strategy, hold)

    def _release_held(self) -> None:
        for param in self._held_for_loading:
            param.requires_grad_(True)
        self._held_for_loading = []

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release_held()
        check_optimizers(trainer)
        self.candidates = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
        in_optimizer = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        missing = [name for name, p in self.candidates.items() if id(p) not in in_optimizer]
        if trainer.optimizers and missing:
            rank_zero_warn(
                f"{len(missing)} trainable parameters are in no optimizer (first: {missing[:3]}); they will never"
                " be updated when sampled. HINT: build the optimizer over every parameter with requires_grad=True"
                " (do not filter by requires_grad after freezing)."
            )
        self._last_step = None
        self._last_wishes = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # inside an accumulation window: never change the set here
            return
        self._last_step = step
        start = time.perf_counter_ns()
        # the boundary first, for every method, then the wishes: no method depends on the order of the callbacks
        for participant in self.participants:
            participant.on_step_boundary(trainer, pl_module, batch, batch_idx, step)
        wishes = [p.trainable_parameters(trainer, pl_module, step) for p in self.participants]
        last = self._last_wishes
        changed = last is None or len(last) != len(wishes) or any(a is not b for a, b in zip(wishes, last, strict=True))
        if changed:
            self._last_wishes = wishes
            allowed = set(self.candidates)
            for wish in wishes:
                if wish is not None:
                    allowed &= wish if isinstance(wish, (set, frozenset)) else set(wish)
            if self.candidates and not allowed:
                restricting = [p for p, wish in zip(self.participants, wishes, strict=True) if wish is not None]
                names = ", ".join(type(p).__name__ for p in restricting)
                raise ValueError(
                    f"At optimizer step {step} the trainable sets of {names} have no parameter in common: nothing"
                    " would train. HINT: combine methods whose sets overlap (e.g. LISA with IST draws different"
                    " blocks), or leave parameters outside the blocks (the head) trainable."
                )
            self._apply(trainer, allowed)
        # `log` costs ~0.5 ms on a CPU: call it when the value changes and on the steps the loggers write (every
        # `log_every_n_steps`), so the curve is complete without paying for it on every step.
        logging_ns = 0
        if changed or logger_writes_this_step(trainer):
            logging_start = time.perf_counter_ns()
            pl_module.log("trainable_params", float(self.num_trainable), on_step=True, on_epoch=False)
            logging_ns = time.perf_counter_ns() - logging_start
        self.last_boundary = BoundaryTiming(step, time.perf_counter_ns() - start, logging_ns, changed)

    def refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Re-read the candidate parameters after a callback replaced or removed some of them (e.g. pruning).

        Candidates keep their names: a replaced parameter (a smaller copy under the same name) stays a candidate, a
        removed one leaves; the current trainable set is applied again to the new objects at once, so nothing waits
        for the next optimizer step.
        """
        names = set(self.candidates)
        self.candidates = {name: p for name, p in pl_module.named_parameters() if name in names}
        if self._last_wishes is not None:
            allowed = set(self.candidates)
            for wish in self._last_wishes:
                if wish is not None:
                    allowed &= wish if isinstance(wish, (set, frozenset)) else set(wish)
            self._apply(trainer, allowed)
        else:
            self.num_trainable = sum(p.numel() for p in self.candidates.values() if p.requires_grad)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release_held()
        self._restore()

    def _apply(self, trainer: pl.Trainer, allowed: Set[str]) -> None:
        release = self.release_optimizer_state
        optimizers = trainer.optimizers
        total = 0
        for name, param in self.candidates.items():
            want = name in allowed
            if want:
                total += param.numel()
            if param.requires_grad == want:
                continue
            param.requires_grad_(want)
            param.grad = None
            if release:  # frozen: free its state; reactivated: start from fresh state
                for optimizer in optimizers:
                    optimizer.state.pop(param, None)
        self.num_trainable = total

    def _restore(self) -> None:
        for param in self.candidates.values():
            param.requires_grad_(True)


_CHECKPOINT_KEY = "trainable_set"


def _names_with_optimizer_state(ckpt_path: str | os.PathLike, weights_only: bool | None = None) -> set[str] | None:
    """Names of the parameters that had optimizer state when the checkpoint was saved (``None``: not recorded).

    The file is read as plain data (``torch.load(weights_only=True)``, which every checkpoint of this package
    passes), unless the user gave Lightning ``weights_only=False`` for it: then it is read as Lightning reads it.
    """
    path = Path(ckpt_path)
    path = path / "meta.pt" if path.is_dir() else path  # a distributed checkpoint keeps the rest in meta.pt
    if not path.is_file():
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only is not False, mmap=True)
    recorded = checkpoint.get(_CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    return None if recorded is None else set(recorded["with_optimizer_state"])


def _check_strategy(trainer: pl.Trainer, participant: Callback) -> None:
    strategy = trainer.strategy
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
        raise ValueError(
            f"`{type(participant).__name__}` changes which parameters train during the run, which"
            f" `{type(strategy).__name__}` does not support (it flattens parameters and optimizer state)."
            ' HINT: use `strategy="ddp"`, or FSDP2 (parameters stay separate tensors there):'
            " `ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)` with `fully_shard` in"
            " `configure_model`."
        )
    if isinstance(strategy, DDPStrategy):
        # Frozen layers produce no gradients; DDP must know, or the reducer waits for them and crashes.
        # Lightning keeps the DDP constructor's keyword arguments here until it wraps the model.
        kwargs = ddp_constructor_kwargs(strategy)
        if not kwargs.get("find_unused_parameters"):
            kwargs["find_unused_parameters"] = True
            rank_zero_info(
                f"{type(participant).__name__}: set DDP `find_unused_parameters=True` (frozen layers produce"
                " no gradients)."
            )
        if kwargs.get("static_graph"):
            raise ValueError(
                "`static_graph=True` in the DDP strategy contradicts a trainable set that changes during the run."
                " HINT: remove `static_graph` from the DDPStrategy arguments."
            )
