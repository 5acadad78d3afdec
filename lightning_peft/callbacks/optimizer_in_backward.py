"""Optimizer step in backward: step every parameter as soon as its gradient is complete, then free the gradient."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

__all__ = ["OptimizerInBackward"]


@dataclass
class StepCounts:
    """How the parameters of the last optimizer step were updated: :attr:`OptimizerInBackward.last_step`.

    Attributes:
        in_backward: parameters stepped from their gradient hook during the backward pass (gradient freed at once).
        after_backward: parameters that got no gradient in the last micro-batch but kept one from an earlier
            micro-batch of the accumulation window: the optimizer's own step updated them after the backward pass.
    """

    in_backward: int = 0
    after_backward: int = 0


class OptimizerInBackward(pl.Callback):
    """Run each parameter's optimizer step during the backward pass, as soon as its gradient is complete.

    torchtune calls this optimizer-in-backward. Every trainable parameter gets a
    ``register_post_accumulate_grad_hook``: when its gradient is complete, the optimizer returned by
    ``configure_optimizers`` steps that parameter alone and its ``.grad`` is freed. Gradients of the whole model
    never exist at once; gradient memory becomes about that of the largest trainable parameter instead of all of
    them, which at LLM scale is a large share of training memory (full fine-tuning of a 7B model in bf16 holds
    14 GB of gradients).

    The optimizer stays the one Lightning knows: its ``param_groups`` (so the LR scheduler drives the learning rate
    of every per-parameter step), its ``state`` (saved and restored with checkpoints as usual; a resumed run
    matches the uninterrupted one bit for bit) and its step hooks. A per-parameter step is the optimizer's own
    ``step`` over a view of its groups that holds that parameter only, so any optimizer whose update of a
    parameter reads that parameter's gradient and state alone works (``torch.optim.AdamW``, ``SGD``, bitsandbytes'
    ``AdamW8bit``, ...); the weights after N steps equal those of a normal run. Lightning still calls
    ``optimizer.step(closure)`` once per optimizer step: the closure runs the forward and backward pass (the
    per-parameter steps happen inside it), then the optimizer's step finds no gradient left and changes nothing,
    so LR schedulers, loss and ``lr`` logging behave as usual.

    Composes with the methods that change the trainable set (LISA, IST, Half Fine-Tuning, through
    :class:`~lightning_peft.trainable.TrainableSetController`: released state stays released, a parameter that
    trains again starts with fresh state, frozen rows of Half Fine-Tuning's channel halves stay exactly unchanged),
    with :class:`~lightning_peft.callbacks.ActivationQuantization`, with gradient accumulation (the per-parameter
    steps run in the backward pass of the last micro-batch only; before it gradients accumulate in ``.grad`` as
    usual, so the memory saving holds for the last micro-batch's peak only) and with
    ``gradient_clip_algorithm="value"`` (applied per parameter before its step).

    Refused when training starts, because it cannot be correct there: clipping by global norm (needs every
    gradient before any step), ``LBFGS`` (re-evaluates the closure), bitsandbytes' per-parameter config overrides
    (looked up by position in the groups), manual optimization, a gradient scaler (``precision="16-mixed"`` on
    GPU), :class:`~lightning_peft.callbacks.EarlyPruning` (it edits the gradients before the step) and every
    multi-device strategy (DDP averages gradients after the hooks have run; FSDP and DeepSpeed manage gradients
    themselves). A LightningModule or callback that reads gradients in
    ``on_after_backward`` / ``on_before_optimizer_step`` gets a warning: there are none left at that point.

    Attributes:
        last_step: a :class:`StepCounts` of the last optimizer step.

    Raises:
        ValueError: when training starts, for a configuration it cannot run correctly (see above).

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_peft.callbacks import LISA, OptimizerInBackward
        >>> trainer = pl.Trainer(callbacks=[OptimizerInBackward(), LISA(n_layers=2)], max_steps=100, logger=False)

    In a LightningCLI YAML file::

        trainer:
          callbacks:
            - class_path: OptimizerInBackward
    """

    def __init__(self) -> None:
        self.last_step = StepCounts()
        self._optimizer: torch.optim.Optimizer | None = None
        self._group_of: dict[int, dict[str, Any]] = {}
        self._names: dict[int, str] = {}
        self._handles: list[RemovableHandle] = []
        self._stepped: set[int] = set()
        self._stepping = False
        self._clip_value: float | None = None
        self._clipping_trainer: pl.Trainer | None = None  # the Trainer whose `gradient_clip_val` is held while training
        self._own_step: Any = None  # the optimizer's instance-level `step` before this callback's (an LR scheduler's)
        self._had_own_step = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            _check_trainer(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()  # a previous fit that did not end (interrupted in a notebook)
        optimizer = _the_optimizer(trainer)
        clip_val = trainer.gradient_clip_val
        self._clip_value = float(clip_val) if clip_val and trainer.gradient_clip_algorithm == "value" else None
        if self._clip_value is not None:  # clipped here, per parameter; Lightning's clipping would find no gradient
            self._clipping_trainer = trainer
            trainer.gradient_clip_val = None
        self._names = {id(p): name for name, p in pl_module.named_parameters()}
        self._group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad:  # what the module froze never trains (the controller never unfreezes it)
                    self._handles.append(param.register_post_accumulate_grad_hook(self._step_parameter))
        self._optimizer = optimizer
        self._had_own_step = "step" in vars(optimizer)
        self._own_step = optimizer.step

        # a wrapper of the step it replaces, carrying its attributes: an LR scheduler marks the step it wrapped
        @functools.wraps(self._own_step)
        def step(closure: Any = None, **kwargs: Any) -> Any:
            return self._step(closure, **kwargs)

        optimizer.step = step  # type: ignore[method-assign]
        _warn_gradient_readers(trainer, pl_module)
        if trainer.accumulate_grad_batches > 1:
            rank_zero_info(
                f"OptimizerInBackward: `accumulate_grad_batches={trainer.accumulate_grad_batches}`: gradients"
                " accumulate in `.grad` until the last micro-batch, whose backward pass steps and frees them."
            )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stepping = False
        self._remove()

    def _step(self, closure: Any = None, **kwargs: Any) -> Any:
        """What Lightning calls as ``optimizer.step(closure)``: the closure's backward pass steps the parameters."""
        assert self._optimizer is not None
        self._stepped = set()
        self._stepping = True
        try:
            with torch.enable_grad():
                loss = closure() if closure is not None else None
        finally:
            self._stepping = False
        late = sum(1 for group in self._optimizer.param_groups for p in group["params"] if p.grad is not None)
        self.last_step = StepCounts(len(self._stepped), late)
        # every stepped gradient is freed: the optimizer's own step updates only parameters that kept a gradient
        # from an earlier micro-batch, runs its step hooks and tells the LR scheduler that the optimizer stepped
        self._own_step(**kwargs)
        return loss

    @torch.no_grad()
    def _step_parameter(self, param: Tensor) -> None:
        if not self._stepping or param.grad is None:  # a micro-batch that accumulates, or no step in progress
            return
        key = id(param)
        if key in self._stepped:
            raise RuntimeError(
                f"OptimizerInBackward: the gradient of {self._names.get(key, 'a parameter')!r} was completed twice in"
                " one backward pass, so its optimizer step would run twice. This happens with reentrant activation"
                " checkpointing of a parameter used in several checkpointed segments. HINT: use"
                " `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` (Hugging Face:"
                ' `gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})`).'
            )
        self._stepped.add(key)
        if self._clip_value is not None:
            param.grad.clamp_(-self._clip_value, self._clip_value)
        optimizer = self._optimizer
        assert optimizer is not None
        group = self._group_of[key]
        groups, params = optimizer.param_groups, group["params"]
        # the optimizer's own step over a view of its groups that holds this parameter alone: hyperparameters (the
        # scheduler's learning rate), state and step hooks are the optimizer's
        group["params"] = [param]
        optimizer.param_groups = [group]
        try:
            type(optimizer).step(optimizer)
        finally:
            group["params"] = params
            optimizer.param_groups = groups
        param.grad = None

    def _remove(self) -> None:
        if self._clipping_trainer is not None:
            self._clipping_trainer.gradient_clip_val = self._clip_value
            self._clipping_trainer = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._optimizer is not None:
            if self._had_own_step:
                self._optimizer.step = self._own_step  # type: ignore[method-assign]
            else:
                del self._optimizer.step
            self._optimizer = None


def _check_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    strategy = trainer.strategy
    if not isinstance(strategy, SingleDeviceStrategy):
        raise ValueError(
            f"OptimizerInBackward runs on one device; got `strategy={type(strategy).__name__}`. Under DDP each rank"
            " would step its parameters with its own gradient before the ranks' gradients are averaged, and FSDP /"
            " DeepSpeed manage gradients and optimizer state themselves. HINT: train on one device"
            ' (`devices=1`, `strategy="auto"`), or drop OptimizerInBackward when training on several devices.'
        )
    if not pl_module.automatic_optimization:
        raise ValueError(
            f"OptimizerInBackward needs automatic optimization; {type(pl_module).__name__} sets"
            " `automatic_optimization=False`. HINT: with manual optimization register"
            " `register_post_accumulate_grad_hook` on the parameters yourself, or return the loss from"
            " `training_step` and let Lightning step."
        )
    if trainer.gradient_clip_val and trainer.gradient_clip_algorithm != "value":
        raise ValueError(
            f"OptimizerInBackward cannot clip by global norm (`gradient_clip_val={trainer.gradient_clip_val}`,"
            f" `gradient_clip_algorithm={trainer.gradient_clip_algorithm!r}`): the norm needs every gradient before"
            " the first parameter steps. HINT: remove `gradient_clip_val`, or clip each element with"
            ' `gradient_clip_algorithm="value"` (applied per parameter before its step).'
        )
    if type(pl_module).configure_gradient_clipping is not pl.LightningModule.configure_gradient_clipping:
        raise ValueError(
            f"{type(pl_module).__name__} overrides `configure_gradient_clipping`, which runs after the backward"
            " pass, when OptimizerInBackward has already stepped and freed every gradient. HINT: remove the"
            ' override and use `gradient_clip_algorithm="value"`, or train without OptimizerInBackward.'
        )
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ValueError(
            "OptimizerInBackward cannot run with a gradient scaler (`precision='16-mixed'`): the scaler unscales and"
            " checks every gradient for inf / NaN before the step. HINT: use `precision='bf16-mixed'` (no scaler)."
        )
    from lightning_peft.callbacks.early_pruning import EarlyPruning

    if any(isinstance(callback, EarlyPruning) for callback in trainer.callbacks):
        raise ValueError(
            "OptimizerInBackward cannot run with EarlyPruning: EarlyPruning adds its mask penalty to the gradients"
            " and reads them for its scores before the optimizer step, when OptimizerInBackward has already stepped"
            " and freed them. HINT: run EarlyPruning's estimation without OptimizerInBackward, then train the"
            " pruned model with it."
        )


def _the_optimizer(trainer: pl.Trainer) -> torch.optim.Optimizer:
    optimizers = trainer.optimizers
    if len(optimizers) != 1 or not isinstance(optimizers[0], torch.optim.Optimizer):
        got = [type(o).__name__ for o in optimizers]
        raise ValueError(
            f"OptimizerInBackward needs one `torch.optim.Optimizer` from `configure_optimizers`, got {got}. HINT:"
            " return one optimizer (with an optional LR scheduler)."
        )
    optimizer = optimizers[0]
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            f"OptimizerInBackward cannot step `{type(optimizer).__name__}` per parameter: it re-evaluates the closure"
            " and searches along the direction of all gradients together. HINT: use a per-parameter optimizer such"
            " as `torch.optim.AdamW`, or train without OptimizerInBackward."
        )
    manager = getattr(optimizer, "mng", None)  # bitsandbytes' GlobalOptimManager
    if manager is not None and any(
        getattr(manager, name, None) for name in ("pid2config", "index2config", "module_weight_config_triple")
    ):
        raise ValueError(
            f"OptimizerInBackward cannot step `{type(optimizer).__name__}` per parameter with bitsandbytes'"
            " per-parameter overrides (`GlobalOptimManager.override_config` / `register_module_override`): they are"
            " looked up by the parameter's position in the optimizer's groups, which a one-parameter view changes."
            " HINT: give the overridden parameters their own param group with those hyperparameters instead."
        )
    return optimizer


def _overrides(obj: object, base: type, hook: str) -> bool:
    return getattr(type(obj), hook, None) is not getattr(base, hook, None)


def _warn_gradient_readers(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    readers = (
        [type(pl_module).__name__]
        if any(
            _overrides(pl_module, pl.LightningModule, hook)
            for hook in ("on_after_backward", "on_before_optimizer_step")
        )
        else []
    )
    readers += [
        type(callback).__name__
        for callback in trainer.callbacks
        if _overrides(callback, pl.Callback, "on_before_optimizer_step")
    ]
    if readers:
        rank_zero_warn(
            f"OptimizerInBackward: {', '.join(readers)} override(s) `on_after_backward` / `on_before_optimizer_step`;"
            " with the optimizer step in backward every gradient is already applied and freed there, so code that"
            " reads `.grad` in those hooks sees None. HINT: read gradients with"
            " `param.register_post_accumulate_grad_hook` (registered before training starts, it runs before the"
            " step), or train without OptimizerInBackward."
        )
