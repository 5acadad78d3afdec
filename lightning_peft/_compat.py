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
    "attached_trainer",
    "compile_wrappers_lifted",
    "compiled_modules",
    "ddp_constructor_kwargs",
    "dropout_classes",
    "efficient_attention",
    "fake_tensor",
    "fake_tensor_mode",
    "flash_attention_cpu",
    "hf_auto_models_from_config",
    "hf_masks_as_in_a_real_run",
    "is_spawning_launcher",
    "logger_writes_this_step",
    "muted_logging",
    "own_parameter",
    "restart_weight_averaging",
    "rewrap_ddp",
    "run_before_checkpoint_load",
    "run_before_weights_load",
    "storage_id",
    "tensor_version",
    "undo_before_weights_load",
    "view_base",
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


# --------------------------------------------------------------------------------------------- LightningModule


def attached_trainer(pl_module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or ``None`` (``pl_module.trainer`` raises when there is none).

    Example::

        >>> import lightning.pytorch as pl
        >>> attached_trainer(pl.LightningModule()) is None
        True
    """
    return _attribute(pl_module, "_trainer", "`LightningModule._trainer`")


# ------------------------------------------------------------------------------------------------ torch tensors


def tensor_version(tensor: torch.Tensor) -> int:
    """The version counter of ``tensor`` (bumped by every in-place change; what autograd checks in backward).

    Example::

        >>> t = torch.zeros(2)
        >>> before = tensor_version(t)
        >>> _ = t.add_(1)
        >>> tensor_version(t) == before + 1
        True
    """
    return tensor._version


def view_base(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor ``tensor`` is a view of, or ``tensor`` itself when it is not a view.

    Example::

        >>> t = torch.zeros(4)
        >>> view_base(t[1:]) is t, view_base(t) is t
        (True, True)
    """
    base = tensor._base
    return tensor if base is None else base


def storage_id(tensor: torch.Tensor) -> int:
    """An identifier of ``tensor``'s storage, the same for every view of it; valid for fake tensors too.

    Example::

        >>> t = torch.zeros(4)
        >>> storage_id(t[1:]) == storage_id(t)
        True
    """
    return tensor.untyped_storage()._cdata


def dropout_classes() -> tuple[type[nn.Module], ...]:
    """The base class of torch's dropout modules (``Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ...).

    Example::

        >>> isinstance(nn.Dropout2d(), dropout_classes())
        True
    """
    dropout = _attribute(nn.modules.dropout, "_DropoutNd", "`torch.nn.modules.dropout._DropoutNd`")
    return (dropout,)


def fake_tensor_mode(**kwargs: Any) -> Any:
    """A new ``FakeTensorMode`` (tensors with shapes, dtypes and devices but no data); ``kwargs`` go to it.

    Example::

        >>> with fake_tensor_mode():
        ...     torch.empty(2**40, device="cpu").shape
        torch.Size([1099511627776])
    """
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
    except ImportError as error:
        raise CompatibilityError("`torch._subclasses.fake_tensor.FakeTensorMode`") from error
    return FakeTensorMode(**kwargs)


def fake_tensor(mode: Any, meta: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A fake tensor of ``mode`` with the shape, dtype and strides of the meta tensor ``meta``, on ``device``.

    Example::

        >>> mode = fake_tensor_mode(allow_non_fake_inputs=True)
        >>> fake_tensor(mode, torch.empty(3, 4, device="meta"), torch.device("cpu")).device
        device(type='cpu')
    """
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError as error:
        raise CompatibilityError("`torch._subclasses.fake_tensor.FakeTensor`") from error
    return FakeTensor(mode, meta, device)


def flash_attention_cpu(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    causal: bool,
    mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """The output of the CPU flash-attention kernel that ``scaled_dot_product_attention`` dispatches to on CPU.

    Called directly where the dispatch cannot run (fake tensors), so what it saves for backward is what a real
    step saves.

    Example::

        >>> q = torch.randn(1, 2, 4, 8)
        >>> torch.allclose(flash_attention_cpu(q, q, q, False, None, None),
        ...                torch.nn.functional.scaled_dot_product_attention(q, q, q), atol=1e-5)
        True
    """
    kernel = _attribute(
        torch.ops.aten,
        "_scaled_dot_product_flash_attention_for_cpu",
        "`aten._scaled_dot_product_flash_attention_for_cpu`",
    )
    return kernel(query, key, value, 0.0, causal, attn_mask=mask, scale=scale)[0]


def efficient_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None,
    dropout: float,
    causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """The output of the memory-efficient attention kernel (CUDA), with its log-sum-exp computed for backward.

    Example::

        >>> callable(efficient_attention)
        True
    """
    kernel = _attribute(
        torch.ops.aten, "_scaled_dot_product_efficient_attention", "`aten._scaled_dot_product_efficient_attention`"
    )
    return kernel(query, key, value, bias, True, dropout, causal, scale=scale)[0]


# ------------------------------------------------------------------------------------------------- transformers


@contextlib.contextmanager
def hf_auto_models_from_config() -> Generator[None, None, None]:
    """Inside, ``AutoModel*.from_pretrained(path, ...)`` builds the model from the config alone (no weights read).

    Without transformers installed, nothing changes.

    Example::

        >>> with hf_auto_models_from_config():
        ...     pass
    """
    try:
        from transformers import AutoConfig
        from transformers.models.auto import auto_factory
    except ImportError:
        yield
        return
    base = _attribute(
        auto_factory, "_BaseAutoModelClass", "`transformers.models.auto.auto_factory._BaseAutoModelClass`"
    )
    # transformers 5 defines `from_pretrained` on each auto class, 4 on the base only: replace every definition
    owners, seen = [], [base]
    while seen:
        cls = seen.pop()
        if "from_pretrained" in vars(cls):
            owners.append((cls, vars(cls)["from_pretrained"]))
        seen.extend(cls.__subclasses__())
    if not owners:
        raise CompatibilityError("`_BaseAutoModelClass.from_pretrained`")

    def from_config(cls: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        output_loading_info = kwargs.pop("output_loading_info", False)  # as `from_pretrained`: (model, info)
        config, unused = AutoConfig.from_pretrained(path, return_unused_kwargs=True, **kwargs)
        model = cls.from_config(config, **unused)
        nothing_loaded = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return (model, nothing_loaded) if output_loading_info else model

    for cls, _ in owners:
        cls.from_pretrained = classmethod(from_config)
    try:
        yield
    finally:
        for cls, original in owners:
            cls.from_pretrained = original


@contextlib.contextmanager
def hf_masks_as_in_a_real_run(padded: bool = False) -> Generator[None, None, None]:
    """Let Hugging Face models skip the causal mask on fake tensors where a real run would.

    transformers treats a fake tensor as tracing and then always builds the attention mask (and, with grouped
    key/value heads, repeats keys and values instead of passing ``enable_gqa``), which saves more than a real step.
    Inside, fake tensors do not count as tracing there. Where a decision reads values (unknown on fake tensors),
    ``padded`` decides: with it the mask is built, as for a padded batch; without, the padding mask is taken as all
    ones. Position ids are taken as one sequence per row (no packing). Without transformers, nothing changes.

    Example::

        >>> with hf_masks_as_in_a_real_run(padded=False):
        ...     pass
    """
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    is_tracing = _attribute(masking_utils, "is_tracing", "`transformers.masking_utils.is_tracing`")
    ignore = _attribute(
        masking_utils, "_ignore_causal_mask_sdpa", "`transformers.masking_utils._ignore_causal_mask_sdpa`"
    )
    packed = _attribute(
        masking_utils, "find_packed_sequence_indices", "`transformers.masking_utils.find_packed_sequence_indices`"
    )

    def as_in_a_real_run(function: Callable, unknown: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            masking_utils.is_tracing = lambda tensor=None: is_tracing(None)
            try:
                return function(*args, **kwargs)
            except Exception:  # noqa: BLE001 - a data-dependent read of a fake tensor's values
                return unknown(*args, **kwargs)
            finally:
                masking_utils.is_tracing = is_tracing

        return run

    def unpadded(padding_mask: Any, *args: Any, **kwargs: Any) -> bool:
        return False if padded else ignore(None, *args, **kwargs)

    masking_utils._ignore_causal_mask_sdpa = as_in_a_real_run(ignore, unpadded)
    masking_utils.find_packed_sequence_indices = as_in_a_real_run(packed, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa, masking_utils.find_packed_sequence_indices = ignore, packed


def _optimized_module_class() -> type[nn.Module]:
    eval_frame = _attribute(torch, "_dynamo", "`torch._dynamo`").eval_frame
    return _attribute(eval_frame, "OptimizedModule", "`torch._dynamo.eval_frame.OptimizedModule`")


def compiled_modules(root: nn.Module) -> list[nn.Module]:
    """The ``torch.compile`` wrappers (``OptimizedModule``) among ``root`` and its submodules.

    Example::

        >>> len(compiled_modules(nn.Sequential(torch.compile(nn.Linear(2, 2)), nn.ReLU())))
        1
    """
    optimized = _optimized_module_class()
    return [module for module in root.modules() if isinstance(module, optimized)]


@contextlib.contextmanager
def compile_wrappers_lifted(root: nn.Module) -> Generator[nn.Module, None, None]:
    """Inside the block, every ``torch.compile`` wrapper under ``root`` is replaced by the module it compiles.

    ``torch.compile(module)`` returns an ``OptimizedModule`` holding the module as ``_orig_mod``, so the names of
    everything below it gain ``_orig_mod.``. Inside the block the names are those of the plain model (paths found
    before compiling, or in a checkpoint of the uncompiled model, resolve) and the modules are the same objects;
    on exit the wrappers are put back. Yields ``root`` itself, or the module it compiles when ``root`` is a wrapper.
    Changing shapes inside the block is safe: the compiled code guards on them and recompiles.

    Example::

        >>> model = nn.Sequential(torch.compile(nn.Linear(2, 2)))
        >>> with compile_wrappers_lifted(model) as plain:
        ...     [name for name, _ in plain.named_modules()]
        ['', '0']
        >>> type(model[0]).__name__
        'OptimizedModule'
    """
    optimized = _optimized_module_class()
    while isinstance(root, optimized):
        root = _attribute(root, "_orig_mod", "`OptimizedModule._orig_mod`")
    lifted: list[tuple[nn.Module, str, nn.Module]] = []

    def lift(module: nn.Module) -> None:
        for name, child in list(module.named_children()):
            if isinstance(child, optimized):
                wrapper = child
                while isinstance(child, optimized):
                    child = _attribute(child, "_orig_mod", "`OptimizedModule._orig_mod`")
                lifted.append((module, name, wrapper))
                setattr(module, name, child)
            lift(child)

    lift(root)
    try:
        yield root
    finally:
        for module, name, wrapper in reversed(lifted):
            setattr(module, name, wrapper)


def restart_weight_averaging(trainer: Any, pl_module: nn.Module) -> list[str]:
    """Restart the averaged copies of Lightning's weight-averaging callbacks from ``pl_module`` as it is now.

    ``StochasticWeightAveraging`` and ``WeightAveraging`` (``EMAWeightAveraging``) hold a copy of the module made at
    setup and average into it parameter by parameter; after the model's architecture changed (pruning) the copy no
    longer matches. Each copy is replaced by a fresh copy of ``pl_module`` on the old copy's device, counted as
    zero averages, so the next update starts the average from the current weights.

    Returns:
        The class names of the callbacks restarted (those that held a copy).

    Example::

        >>> restart_weight_averaging(None, nn.Linear(2, 2))
        []
    """
    import copy

    from lightning.pytorch.callbacks import StochasticWeightAveraging

    try:
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:  # lightning < 2.6
        WeightAveraging = ()  # noqa: N806
    restarted = []
    for callback in [] if trainer is None else trainer.callbacks:
        if not isinstance(callback, (StochasticWeightAveraging, WeightAveraging)):
            continue
        average = _attribute(callback, "_average_model", f"`{type(callback).__name__}._average_model`")
        if average is None:
            continue
        if isinstance(callback, StochasticWeightAveraging):
            device = next(average.parameters(), torch.empty(0)).device
            callback._average_model = copy.deepcopy(pl_module).to(device)
            if callback.n_averaged is not None:
                callback.n_averaged.zero_()
            _attribute(callback, "_init_n_averaged", "`StochasticWeightAveraging._init_n_averaged`")
            callback._init_n_averaged = 0
        else:
            device = next(average.module.parameters(), torch.empty(0)).device
            average.module = copy.deepcopy(pl_module).to(device)
            average.n_averaged.zero_()
        restarted.append(type(callback).__name__)
    return restarted
