"""Every use of private or patched Lightning / torch API, each behind one small function.

Nothing else in the package touches a private attribute of Lightning or torch. Each function checks that what it
relies on is there and otherwise raises a :class:`CompatibilityError` naming the installed versions and the ones
this was written against; ``tests/test_compat.py`` calls each one, so an upgrade that moves one fails there, by
name, rather than somewhere inside a training run.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Generator
from typing import Any

import lightning
import torch
from torch import nn

__all__ = [
    "TESTED",
    "CompatibilityError",
    "ddp_constructor_kwargs",
    "is_spawning_launcher",
    "logger_writes_this_step",
    "muted_logging",
    "own_parameter",
    "rewrap_ddp",
    "run_before_checkpoint_load",
    "run_before_weights_load",
    "undo_before_weights_load",
]

TESTED = {"lightning": "2.6", "torch": "2.14"}


class CompatibilityError(RuntimeError):
    """An internal Lightning / torch API this package relies on is missing from the installed versions.

    Example::

        >>> str(CompatibilityError("`Strategy._ddp_kwargs`")).startswith("lightning-peft relies on")
        True
    """

    def __init__(self, what: str) -> None:
        super().__init__(
            f"lightning-peft relies on {what}, which lightning {lightning.__version__} / torch {torch.__version__}"
            f" do not provide (written against lightning {TESTED['lightning']}, torch {TESTED['torch']})."
            " HINT: install the versions in pyproject.toml's bounds, or report the new versions."
        )


def _attribute(owner: Any, name: str, what: str) -> Any:
    if not hasattr(owner, name):
        raise CompatibilityError(what)
    return getattr(owner, name)


def ddp_constructor_kwargs(strategy: Any) -> dict[str, Any]:
    """The keyword arguments a ``DDPStrategy`` keeps for the ``DistributedDataParallel`` it builds (editable).

    Example::

        >>> from lightning.pytorch.strategies import DDPStrategy
        >>> ddp_constructor_kwargs(DDPStrategy(find_unused_parameters=True))
        {'find_unused_parameters': True}
    """
    kwargs = _attribute(strategy, "_ddp_kwargs", "`DDPStrategy._ddp_kwargs`")
    if not isinstance(kwargs, dict):
        raise CompatibilityError("`DDPStrategy._ddp_kwargs` being a dict")
    return kwargs


def logger_writes_this_step(trainer: Any) -> bool:
    """Whether the loggers write the metrics of the current training step (every ``log_every_n_steps``).

    ``LightningModule.log`` costs about half a millisecond of CPU time; per-step diagnostics call it only on the steps
    whose metrics the loggers keep. Valid from ``on_train_batch_start`` to ``on_train_batch_end``.

    Example::

        >>> import lightning.pytorch as pl
        >>> logger_writes_this_step(pl.Trainer(logger=False))
        True
    """
    connector = _attribute(trainer, "_logger_connector", "`Trainer._logger_connector`")
    return bool(_attribute(connector, "should_update_logs", "`_LoggerConnector.should_update_logs`"))


_WRAPPED_LOADERS: weakref.WeakSet = weakref.WeakSet()


def run_before_checkpoint_load(strategy: Any, before: Callable[..., None]) -> None:
    """Call ``before(checkpoint_path, *args, **kwargs)`` (the loader's own arguments) right before each load.

    Wrapping happens once per strategy, however often asked.

    Lightning has no hook between building the optimizers and loading a checkpoint into them under FSDP2 (callbacks
    do not even know the path before the load), so the strategy's ``load_checkpoint`` is wrapped.

    Example::

        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> strategy = SingleDeviceStrategy("cpu")
        >>> run_before_checkpoint_load(strategy, lambda path, *args, **kwargs: print(path))
    """
    if strategy in _WRAPPED_LOADERS:
        return
    load_checkpoint = _attribute(strategy, "load_checkpoint", "`Strategy.load_checkpoint`")

    def load_with_hook(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        before(checkpoint_path, *args, **kwargs)
        return load_checkpoint(checkpoint_path, *args, **kwargs)

    strategy.load_checkpoint = load_with_hook
    _WRAPPED_LOADERS.add(strategy)


def is_spawning_launcher(strategy: Any) -> bool:
    """Whether ``strategy`` starts its workers by spawning or forking (``ddp_spawn``, ``ddp_fork``, notebooks).

    Example::

        >>> from lightning.pytorch.strategies import DDPStrategy
        >>> is_spawning_launcher(DDPStrategy(start_method="spawn")), is_spawning_launcher(DDPStrategy())
        (True, False)
    """
    try:
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
    except ImportError as error:
        what = "`lightning.pytorch.strategies.launchers.multiprocessing._MultiProcessingLauncher`"
        raise CompatibilityError(what) from error
    launcher = getattr(strategy, "launcher", None)
    if launcher is None and getattr(strategy, "_start_method", None) in ("spawn", "fork", "forkserver"):
        return True  # the launcher is built at `setup_environment`; before that the start method tells
    return isinstance(launcher, _MultiProcessingLauncher)


def rewrap_ddp(strategy: Any, module: nn.Module) -> None:
    """Wrap ``module`` in a new ``DistributedDataParallel`` (its parameters changed) with the strategy's DDP hooks.

    Example::

        >>> callable(rewrap_ddp)
        True
    """
    setup_model = _attribute(strategy, "_setup_model", "`DDPStrategy._setup_model`")
    register_hooks = _attribute(strategy, "_register_ddp_hooks", "`DDPStrategy._register_ddp_hooks`")
    strategy.model = setup_model(module)
    register_hooks()


def own_parameter(module: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor registered as parameter ``name`` of ``module`` itself, without running a parametrization.

    Example::

        >>> own_parameter(nn.Linear(2, 2), "weight").shape
        torch.Size([2, 2])
    """
    parameters = _attribute(module, "_parameters", "`nn.Module._parameters`")
    return parameters.get(name)


def run_before_weights_load(pl_module: Any, before: Callable[[Any, dict], None]) -> None:
    """Call ``before(pl_module, checkpoint)`` right before Lightning loads a checkpoint's weights into ``pl_module``.

    Lightning calls the LightningModule's ``on_load_checkpoint`` right before the weights load (callbacks are
    restored only afterwards), so the module's own hook is wrapped on the instance; :func:`undo_before_weights_load`
    restores it.

    Example::

        >>> import lightning.pytorch as pl
        >>> module = pl.LightningModule()
        >>> run_before_weights_load(module, lambda m, checkpoint: print(sorted(checkpoint)))
        >>> module.on_load_checkpoint({"state_dict": {}})
        ['state_dict']
        >>> undo_before_weights_load(module)
    """
    original = _attribute(pl_module, "on_load_checkpoint", "`LightningModule.on_load_checkpoint`")

    def on_load_checkpoint(checkpoint: dict) -> None:
        before(pl_module, checkpoint)
        original(checkpoint)

    pl_module.on_load_checkpoint = on_load_checkpoint


def undo_before_weights_load(pl_module: Any) -> None:
    """Remove the wrapper of :func:`run_before_weights_load` (the class's ``on_load_checkpoint`` applies again)."""
    if "on_load_checkpoint" in vars(pl_module):
        del pl_module.on_load_checkpoint


def _no_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` / ``log_dict`` while a method scores batches."""


@contextlib.contextmanager
def muted_logging(pl_module: Any) -> Generator[None, None, None]:
    """Run a LightningModule's ``training_step`` for a score without logging (its ``log`` calls do nothing).

    Example::

        >>> import lightning.pytorch as pl
        >>> module = pl.LightningModule()
        >>> with muted_logging(module):
        ...     module.log("x", 1.0)
    """
    _attribute(pl_module, "log", "`LightningModule.log`")
    pl_module.log = _no_log
    pl_module.log_dict = _no_log
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict
