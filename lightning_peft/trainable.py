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

**Row masks.** A method may also restrict a parameter to some of its rows (dim 0: the output channels of a
convolution or linear layer, with the matching bias entries) through :meth:`TrainableSetCallback.trainable_rows`:
a boolean mask per parameter name, ``True`` where the row trains. ``requires_grad`` is per tensor, so the controller
does the rest itself, at the same boundaries and after the sets:

* the row masks of all methods combine by AND, for the parameters of the combined trainable set only: a parameter
  that any method's set freezes is frozen whole (no gradient, optimizer state released), whatever the rows say; a
  combined mask with no row left freezes the parameter whole, one with every row is no restriction;
* every row-masked parameter gets one gradient hook that zeroes the gradient of its frozen rows, and every optimizer
  one step post-hook that writes the frozen rows back to the values held when the mask began applying, so weight
  decay and momentum cannot move them (only the frozen rows are held, on the parameter's device; a step over a view
  of the optimizer's groups, as OptimizerInBackward's per-parameter steps, writes back the parameters of that view
  only). The values are
  held again when a method returns a new mask mapping (it may have written into the parameters, as Half
  Fine-Tuning's reset does), when the parameter trains again after being frozen whole, and after :meth:`refresh`;
* a row-masked parameter keeps its optimizer state (its trained rows need it; the state of the frozen rows is
  unused while they are written back); it is released if the parameter freezes whole and fresh when it trains again;
* ``trainable_params`` counts the trained rows only;
* the hooks are removed, through their handles, at the end of ``fit`` and on an exception;
* under FSDP2 row masks are refused (a sharded parameter splits its rows across ranks).

Candidates are the parameters with ``requires_grad=True`` when training starts: what the user's module froze
(e.g. a peft base model) stays frozen and is never touched. Parameters are held by identity (a method's names may
predate ``torch.compile``'s ``_orig_mod.`` or pruning's ``weight_orig``), and at every boundary the controller
checks the flags it set: a candidate frozen from outside leaves the candidates, one the methods froze and someone
made trainable is frozen again, a parameter frozen at the start and made trainable later (BackboneFinetuning) joins
them -- each reported once, naming the parameters, the methods and the likely culprit.

One file on purpose (over 600 lines): the controller's rules (sets, row masks, released state, identity,
outside changes) act on the same state at the same boundary; split, each part would reach into the others.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BaseFinetuning, Callback, ModelPruning
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_peft._compat import ddp_constructor_kwargs, logger_writes_this_step, run_before_checkpoint_load
from lightning_peft._sharding import check_optimizers

__all__ = ["BoundaryTiming", "TrainableSetCallback", "TrainableSetController", "agree_seed", "likely_culprit"]


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
    and intersects the answers of all such callbacks. A subclass that trains parts of a parameter also implements
    :meth:`trainable_rows`. Subclasses that override ``setup`` must call ``super().setup(...)``, which attaches the
    controller.

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

    def names_except(self, names: Iterable[str], frozen: Iterable[str]) -> frozenset[str]:
        """Those of ``names`` that denote none of the parameters ``frozen`` names, matched by identity.

        A method that takes its names at setup and the module's at a later step gets both right through this, after
        ``torch.compile`` in ``configure_model`` (``_orig_mod.``) or a pruning callback (``weight_orig``) renamed
        them. Without a controller (outside ``fit``) names are compared as strings.

        Example::

            >>> TrainableSetCallback().names_except(["a.weight", "b.weight"], ["b.weight"])
            frozenset({'a.weight'})
        """
        if self.controller is None:
            excluded = set(frozen)
            return frozenset(n for n in names if n not in excluded)
        param = self.controller.parameter
        ids = {id(p) for n in frozen if (p := param(n)) is not None}
        return frozenset(n for n in names if (p := param(n)) is None or id(p) not in ids)

    def trainable_rows(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> Mapping[str, Tensor] | None:
        """Row masks of the parameters this callback lets train only in part at ``step`` (``None``: whole tensors).

        Called once per optimizer step, right after :meth:`trainable_parameters`. Each value is a 1-D boolean
        tensor with one entry per row of the named parameter (dim 0: output channels; a bias has the rows of its
        weight), ``True`` where the row trains. The controller zeroes the gradient of the other rows and writes them
        back after every optimizer step (see the module docstring); a parameter named here must also be in this
        callback's trainable set, else it is frozen whole. Return the *same object* while nothing changes; a new
        object makes the controller hold the frozen rows' current values again. Default: ``None``.

        Example::

            >>> class TrainEvenChannels(TrainableSetCallback):
            ...     def trainable_parameters(self, trainer, pl_module, step):
            ...         return None
            ...     def trainable_rows(self, trainer, pl_module, step):
            ...         if not hasattr(self, "_rows"):
            ...             self._rows = {n: torch.arange(p.shape[0]) % 2 == 0 for n, p in pl_module.named_parameters()
            ...                           if n.startswith("conv.") and p.dim() >= 1}
            ...         return self._rows
        """
        return None


@dataclass
class _RowRestriction:
    """A parameter that trains on some rows: its frozen rows, their held values and its gradient hook."""

    param: nn.Parameter
    mask: Tensor  # combined row mask, as the methods gave it (on the CPU)
    frozen: Tensor  # indices of the frozen rows, on the parameter's device
    held: Tensor  # values of the frozen rows when the mask began applying
    handle: RemovableHandle  # the gradient hook that zeroes the frozen rows' gradient


@dataclass
class BoundaryTiming:
    """What the controller's last optimizer-step boundary cost: :attr:`TrainableSetController.last_boundary`.

    Attributes:
        step: the optimizer step of the boundary.
        total_ns: wall time of the whole boundary (methods' ``on_step_boundary``, their sets, applying, logging).
        logging_ns: the part spent in ``pl_module.log`` of ``trainable_params``.
        changed: whether any method's set or row masks changed (only then are ``requires_grad`` flags, hooks and
            state touched).
    """

    step: int
    total_ns: int
    logging_ns: int
    changed: bool


class TrainableSetController(Callback):
    """Applies the combined trainable set of all :class:`TrainableSetCallback` s at optimizer-step boundaries.

    Added automatically by the first such callback (one controller per Trainer); users do not create it. It logs
    ``trainable_params`` (the number of parameter elements that train, trained rows only for a row-masked parameter)
    whenever it changes and on every step the loggers write.

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
        self._last_rows: list[Mapping[str, Tensor] | None] | None = None
        self._rows: dict[str, _RowRestriction] = {}
        self._step_hooks: list[RemovableHandle] = []
        self._held_for_loading: list[nn.Parameter] = []
        self._module: nn.Module | None = None
        self._unknown: set[str] = set()  # names found nowhere since the module's names were last read
        self._aliases: dict[str, nn.Parameter] = {}  # every name a parameter had during this fit, to the parameter
        self._allowed_now: set[str] | None = None  # the candidates it last left trainable (None: not started)
        self._outsiders: dict[str, nn.Parameter] = {}  # frozen when training started: not the methods' to decide
        self._warned: set[str] = set()
        #: Increases whenever the candidates change (a parameter frozen or made trainable from outside); a method
        #: that depends on them (LISA's pool of blocks) recomputes when it moves.
        self.generation = 0
        #: Cost of the most recent optimizer-step boundary (``None`` before the first); benchmarks read it after
        #: each batch to time the controller without wrapping its hooks.
        self.last_boundary: BoundaryTiming | None = None

    @property
    def release_optimizer_state(self) -> bool:
        """Whether state of parameters that stop training is released (any participant asking is enough)."""
        return any(p.release_optimizer_state for p in self.participants)

    @property
    def row_masks(self) -> dict[str, Tensor]:
        """The combined row masks now applied (parameter name to boolean mask over dim 0, ``True``: trains)."""
        return {name: restriction.mask for name, restriction in self._rows.items()}

    def parameter(self, name: str) -> nn.Parameter | None:
        """The parameter that ``name`` denotes now or denoted earlier in this fit (``None``: no parameter).

        Parameters are held by identity: a name a method took at setup still finds its parameter after
        ``torch.compile`` in ``configure_model`` inserted ``_orig_mod.`` or ``torch.nn.utils.prune`` renamed
        ``weight`` to ``weight_orig``. A name that now denotes another object (a parameter replaced under its name)
        denotes the current one.
        """
        param = self._aliases.get(name)
        if param is None and self._module is not None and name not in self._unknown:
            self._remember_names(self._module)  # a name not seen yet: read the module's current names, once
            param = self._aliases.get(name)
            if param is None:
                self._unknown.add(name)
        return param

    def may_train(self, names: Iterable[str]) -> bool:
        """Whether any of ``names`` denotes a candidate, a parameter the methods decide for.

        Candidates are the parameters trainable when training started and those something outside the methods made
        trainable since, not the ones the user or another callback froze.
        """
        ids = {id(p) for p in self.candidates.values()}
        return any((p := self.parameter(n)) is not None and id(p) in ids for n in names)

    def _remember_names(self, module: nn.Module) -> None:
        self._module = module
        self._unknown = set()
        for name, param in module.named_parameters():
            self._aliases[name] = param

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # the names the methods see in their own setup, before `configure_model`
            self._aliases = {}
            self._remember_names(pl_module)

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
        self._outsiders = {name: p for name, p in pl_module.named_parameters() if not p.requires_grad}
        self._remember_names(pl_module)
        self._allowed_now = set(self.candidates)
        self._warned = set()
        self.generation += 1
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
        self._last_rows = None
        self._remove_row_hooks()

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
        if self._outside_changes(trainer, step):  # the flags it set were changed by someone else: apply again
            self._last_wishes = None
        for participant in self.participants:
            participant.on_step_boundary(trainer, pl_module, batch, batch_idx, step)
        wishes = [p.trainable_parameters(trainer, pl_module, step) for p in self.participants]
        rows = [p.trainable_rows(trainer, pl_module, step) for p in self.participants]
        changed = _changed(self._last_wishes, wishes)
        rows_changed = _changed(self._last_rows, rows)
        if changed or rows_changed:
            changed = True
            self._last_wishes, self._last_rows = wishes, rows
            self._apply(trainer, wishes, rows, rehold=rows_changed, step=step)
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
        for the next optimizer step. Row masks move to the new objects too (their frozen rows held again); a mask
        that no longer fits its parameter's rows raises.
        """
        names = set(self.candidates)
        self.candidates = {name: p for name, p in pl_module.named_parameters() if name in names}
        self._outsiders = {n: p for n, p in pl_module.named_parameters() if n not in names and not p.requires_grad}
        self._remember_names(pl_module)
        self.generation += 1
        if self._last_wishes is not None and self._last_rows is not None:
            self._apply(trainer, self._last_wishes, self._last_rows, rehold=True, step=trainer.global_step)
        else:
            self.num_trainable = sum(p.numel() for p in self.candidates.values() if p.requires_grad)

    def _outside_changes(self, trainer: pl.Trainer, step: int) -> bool:
        """Notice ``requires_grad`` flags changed by someone else since the last boundary; ``True``: apply again.

        A candidate someone froze leaves the candidates (it stays frozen, as they asked); a candidate the methods
        froze that someone made trainable is frozen again (a parameter trains only if every method allows it); a
        parameter frozen when training started that someone made trainable joins the candidates (the methods decide
        for it from now on: LISA samples its block). Each kind is reported once per fit, naming the parameters, the
        methods and the likely culprit.
        """
        allowed = self._allowed_now
        if allowed is None:
            return False
        froze, unfroze, adopted = [], [], []
        for name, param in self.candidates.items():
            if param.requires_grad != (name in allowed):
                (unfroze if param.requires_grad else froze).append(name)
        for name, param in self._outsiders.items():
            if param.requires_grad:
                adopted.append(name)
        if not (froze or unfroze or adopted):
            return False
        methods = ", ".join(dict.fromkeys(type(p).__name__ for p in self.participants))
        culprit = likely_culprit(trainer)
        if adopted and isinstance(trainer.strategy, DDPStrategy):
            # DDP synchronises only what required grad when it wrapped the model: these would drift apart per rank
            raise ValueError(
                f"Before optimizer step {step}, {culprit} made {len(adopted)} parameters trainable that were frozen"
                f" when DDP wrapped the model ({_first(adopted)}): DDP does not synchronise their gradients, so"
                f" each rank would train its own copy, and {methods} cannot change that. HINT: leave them trainable"
                " when `fit` starts (the methods freeze what they do not train), or train on one device."
            )
        for name in froze:
            self._outsiders[name] = self.candidates.pop(name)
        for name in adopted:
            self.candidates[name] = self._outsiders.pop(name)
        if froze or adopted:
            self.generation += 1
        if froze and "froze" not in self._warned:
            self._warned.add("froze")
            rank_zero_warn(
                f"Before optimizer step {step}, {culprit} froze {len(froze)} parameters that {methods} let train"
                f" ({_first(froze)}). They stay frozen, whatever {methods} choose: no method trains what is frozen from"
                " outside. HINT: to let the methods train them, do not change their `requires_grad` during the run."
            )
        if unfroze and "unfroze" not in self._warned:
            self._warned.add("unfroze")
            rank_zero_warn(
                f"Before optimizer step {step}, {culprit} made {len(unfroze)} parameters trainable that {methods}"
                f" keep frozen ({_first(unfroze)}). They are frozen again: a parameter trains only if every method"
                f" allows it. HINT: to train them, give {methods} settings that include them, or remove"
                f" {methods} from the callbacks."
            )
        if adopted and "adopted" not in self._warned:
            self._warned.add("adopted")
            rank_zero_warn(
                f"Before optimizer step {step}, {culprit} made {len(adopted)} parameters trainable that were frozen"
                f" when training started ({_first(adopted)}). From now on they train only where {methods} allow it,"
                " as the others (LISA samples their blocks; an unsampled block stays frozen). HINT: to train them"
                " whatever the methods choose, leave the methods out; to never train them, do not unfreeze them."
            )
        return True

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release_held()
        self._restore()

    def _allowed(self, wishes: list[Set[str] | None], step: int) -> set[str]:
        # by identity: a method's names may be those of its setup, before `configure_model` compiled the model or
        # a pruning callback renamed the parameters
        allowed_ids = {id(p) for p in self.candidates.values()}
        for wish in wishes:
            if wish is not None:
                allowed_ids &= {id(p) for name in wish if (p := self.parameter(name)) is not None}
        allowed = {name for name, p in self.candidates.items() if id(p) in allowed_ids}
        if self.candidates and not allowed:
            restricting = [p for p, wish in zip(self.participants, wishes, strict=True) if wish is not None]
            names = ", ".join(type(p).__name__ for p in restricting)
            raise ValueError(
                f"At optimizer step {step} the trainable sets of {names} have no parameter in common: nothing"
                " would train. HINT: combine methods whose sets overlap (e.g. LISA with IST draws different"
                " blocks), or leave parameters outside the blocks (the head) trainable."
            )
        return allowed

    def _combined_rows(
        self, trainer: pl.Trainer, rows: list[Mapping[str, Tensor] | None], allowed: set[str]
    ) -> dict[str, Tensor]:
        """AND of the methods' row masks over the allowed parameters (unrestricted ones left out)."""
        combined: dict[str, Tensor] = {}
        candidate_names = {id(p): n for n, p in self.candidates.items()}
        for participant, wish in zip(self.participants, rows, strict=True):
            if not wish:
                continue
            _check_rows_supported(trainer, participant)
            for given, mask in wish.items():
                param = self.parameter(given)
                name = candidate_names.get(id(param), given)  # the candidate's own name, whatever name was given
                if name not in allowed:  # frozen whole by some method's set (or by the user): rows do not matter
                    if param is None:
                        raise ValueError(
                            f"`{type(participant).__name__}.trainable_rows` names {name!r}, which is no parameter of"
                            f" {type(trainer.lightning_module).__name__}. HINT: use the names of"
                            " `pl_module.named_parameters()`."
                        )
                    continue
                param = self.candidates[name]
                n_rows = param.shape[0] if param.dim() else 1
                if not (isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.shape == (n_rows,)):
                    got = f"{mask.dtype} of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask)
                    raise ValueError(
                        f"`{type(participant).__name__}.trainable_rows` gave {name!r} a mask of {got}; expected a"
                        f" bool tensor of shape ({n_rows},), one entry per row (dim 0) of the parameter. HINT:"
                        " build it as `torch.zeros(param.shape[0], dtype=torch.bool)` and set the rows that train."
                    )
                mask = mask.to("cpu")
                combined[name] = combined[name] & mask if name in combined else mask
        return {name: mask for name, mask in combined.items() if not bool(mask.all())}

    def _apply(
        self,
        trainer: pl.Trainer,
        wishes: list[Set[str] | None],
        rows: list[Mapping[str, Tensor] | None],
        rehold: bool,
        step: int,
    ) -> None:
        allowed = self._allowed(wishes, step)
        combined = self._combined_rows(trainer, rows, allowed)
        empty = {name for name, mask in combined.items() if not bool(mask.any())}
        if empty:  # no row left: frozen whole, which also releases its state
            allowed -= empty
            combined = {name: mask for name, mask in combined.items() if name not in empty}
            if not allowed:
                raise ValueError(
                    f"At optimizer step {step} the row masks leave no row of {sorted(empty)[:3]} and the sets no"
                    " other parameter: nothing would train. HINT: let at least one row of each masked parameter train."
                )
        release = self.release_optimizer_state
        optimizers = trainer.optimizers
        reactivated: set[str] = set()
        for name, param in self.candidates.items():
            want = name in allowed
            if param.requires_grad == want:
                continue
            param.requires_grad_(want)
            param.grad = None
            if want:
                reactivated.add(name)
            if release:  # frozen: free its state; reactivated: start from fresh state
                for optimizer in optimizers:
                    optimizer.state.pop(param, None)
        self._restrict_rows(trainer, combined, reactivated, rehold)
        self._allowed_now = allowed
        total = 0
        for name in allowed:
            param = self.candidates[name]
            mask = combined.get(name)
            total += param.numel() if mask is None else int(mask.sum()) * (param.numel() // mask.numel())
        self.num_trainable = total

    def _restrict_rows(
        self, trainer: pl.Trainer, combined: dict[str, Tensor], reactivated: set[str], rehold: bool
    ) -> None:
        """Install, update or remove the gradient hooks and held rows so that exactly ``combined`` applies."""
        for name in [n for n in self._rows if n not in combined]:
            self._rows.pop(name).handle.remove()
        for name, mask in combined.items():
            param = self.candidates[name]
            current = self._rows.get(name)
            if (
                current is not None
                and current.param is param
                and not rehold
                and name not in reactivated
                and torch.equal(current.mask, mask)
            ):
                continue
            if current is not None:
                current.handle.remove()
            frozen = (~mask).nonzero().flatten().to(param.device)
            held = param.detach().index_select(0, frozen)
            restriction = _RowRestriction(param, mask, frozen, held, param.register_hook(_zero_rows(frozen)))
            self._rows[name] = restriction
        if self._rows and not self._step_hooks:
            self._step_hooks = [opt.register_step_post_hook(self._write_back_frozen_rows) for opt in trainer.optimizers]

    @torch.no_grad()
    def _write_back_frozen_rows(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # only the parameters this step could change: a step over part of the optimizer's groups (OptimizerInBackward
        # steps one parameter at a time, inside the backward pass) must not write into the others, which the rest of
        # the backward pass may still read
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for restriction in self._rows.values():
            if id(restriction.param) in stepped:
                restriction.param.index_copy_(0, restriction.frozen, restriction.held)

    def _remove_row_hooks(self) -> None:
        for restriction in self._rows.values():
            restriction.handle.remove()
        self._rows = {}
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []

    def _restore(self) -> None:
        self._remove_row_hooks()
        for param in self.candidates.values():
            param.requires_grad_(True)


def _changed(last: list[Any] | None, now: list[Any]) -> bool:
    """Whether any method returned another object than last time (identity: methods return the same while equal)."""
    return last is None or len(last) != len(now) or any(a is not b for a, b in zip(now, last, strict=True))


def _first(names: list[str], count: int = 3) -> str:
    more = f", ... ({len(names) - count} more)" if len(names) > count else ""
    return ", ".join(f"`{n}`" for n in names[:count]) + more


def likely_culprit(trainer: pl.Trainer) -> str:
    """Who changes ``requires_grad`` besides the methods: the Trainer's BaseFinetuning / ModelPruning callbacks.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.callbacks import BackboneFinetuning
        >>> likely_culprit(pl.Trainer(callbacks=[BackboneFinetuning()], logger=False))
        'BackboneFinetuning'
    """
    suspects = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, (BaseFinetuning, ModelPruning))]
    return " or ".join(dict.fromkeys(suspects)) or "the LightningModule or a callback"


def _zero_rows(frozen: Tensor) -> Any:
    def hook(grad: Tensor) -> Tensor:
        return grad.index_fill(0, frozen, 0)

    return hook


def _check_rows_supported(trainer: pl.Trainer, participant: TrainableSetCallback) -> None:
    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy):
        raise ValueError(
            f"`{type(participant).__name__}` trains parts of parameters (row masks from `trainable_rows`), which"
            f" `strategy={type(strategy).__name__}` does not support: FSDP2 shards every parameter along its rows"
            ' across ranks. HINT: use `strategy="ddp"`, or configure the method to train whole parameters.'
        )


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
