"""Internals shared by the ready LightningModules.

- :func:`build_peft_config` turns the ``peft`` argument (a dict from YAML, or a ``peft.PeftConfig``) into a checked
  ``PeftConfig``; :func:`apply_peft` wraps a network with it, keeping the classification head trainable.
- :class:`ClassifierModule` holds the training/validation/test steps, the accuracy metrics and the optimizer set-up
  that every classifier of this package shares.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_peft._compat import attached_trainer
from lightning_peft.adapters import ADAPTER_PEFT_TYPES, AdapterConfig, add_adapters
from lightning_peft.layers import find_layers
from lightning_peft.pruning import restore_pruned_architecture


def checked_model_kwargs(owner: str, model_kwargs: Mapping[str, Any] | None, reserved: Sequence[str]) -> dict:
    """Return a copy of ``model_kwargs``, refusing keys that ``owner`` takes as its own arguments."""
    kwargs = dict(model_kwargs or {})
    clashes = sorted(set(kwargs) & set(reserved))
    if clashes:
        raise ValueError(
            f"`model_kwargs` must not repeat arguments of {owner} {list(reserved)}, got {clashes}."
            f" HINT: pass them as {owner} arguments instead."
        )
    return kwargs


def build_peft_config(peft: Mapping[str, Any] | PeftConfig | None, default_task_type: str | None = None):
    """Check the ``peft`` argument of a module and return it as a fresh ``PeftConfig`` (or None).

    Args:
        peft: An HF peft config as a dict (``{"peft_type": "LORA", "r": 8, ...}``), a ``PeftConfig``, or None. The
            adapters of this package are named the same way: ``{"peft_type": "BOTTLENECK", "layout": "houlsby"}``
            (or ``CONFORMER``) gives a :class:`~lightning_peft.adapters.AdapterConfig`.
        default_task_type: Task type to set when the config names none (e.g. ``"SEQ_CLS"``).

    Returns:
        A copy of the config (the caller's object is never changed), or None when ``peft`` is None.

    Raises:
        TypeError: If ``peft`` is neither a dict nor a ``PeftConfig``.
        ValueError: If the dict has no known ``peft_type`` or has keys that its config class rejects.
    """
    if peft is None:
        return None
    if isinstance(peft, (PeftConfig, AdapterConfig)):
        config = copy.deepcopy(peft)
    elif isinstance(peft, Mapping):
        fields = dict(peft)
        allowed = ", ".join([str(t.value) for t in PEFT_TYPE_TO_CONFIG_MAPPING] + list(ADAPTER_PEFT_TYPES))
        if "peft_type" not in fields:
            raise ValueError(
                f"`peft` must name its method in a `peft_type` key, got keys {sorted(fields)}."
                f" HINT: add e.g. `peft_type: LORA` (one of {allowed})."
            )
        fields["peft_type"] = str(fields["peft_type"]).upper()
        if fields["peft_type"] in ADAPTER_PEFT_TYPES:
            config_class = AdapterConfig
        elif fields["peft_type"] not in PEFT_TYPE_TO_CONFIG_MAPPING:
            raise ValueError(
                f"`peft.peft_type` must be one of {allowed}, got {peft['peft_type']!r}."
                " HINT: use `LORA` for LoRA adapters."
            )
        else:
            config_class = PEFT_TYPE_TO_CONFIG_MAPPING[fields["peft_type"]]
        try:
            config = config_class(**fields)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"`peft` is not a valid {config_class.__name__}: {err}."
                f" HINT: keep only the fields of `peft.{config_class.__name__}` in the dict."
            ) from err
    else:
        raise TypeError(
            f"`peft` must be a dict or a `peft.PeftConfig`, got {type(peft).__name__}."
            " HINT: pass e.g. {'peft_type': 'LORA', 'r': 8, 'target_modules': ['qkv']}."
        )
    if default_task_type is not None and getattr(config, "task_type", None) is None:
        config.task_type = default_task_type
    return config


def apply_peft(model: nn.Module, config: PeftConfig | AdapterConfig, head_names: Sequence[str] = ()) -> nn.Module:
    """Wrap ``model`` with ``config``, adding ``head_names`` to ``modules_to_save`` when the config sets none.

    An :class:`~lightning_peft.adapters.AdapterConfig` inserts this package's adapters in place instead
    (:func:`~lightning_peft.adapters.add_adapters`) and returns ``model`` itself.

    Args:
        model: The network to adapt.
        config: A config from :func:`build_peft_config`; it is changed in place.
        head_names: Module names of the classification head, kept fully trainable.

    Returns:
        The ``PeftModel`` (or the adapted model): only the adapter and ``modules_to_save`` parameters require
        gradients.

    Raises:
        ValueError: If peft cannot place the adapters (e.g. no ``target_modules`` for a non-HF model); the message
            lists the Linear layer names that could be targeted.
    """
    if head_names and hasattr(config, "modules_to_save") and not config.modules_to_save:
        config.modules_to_save = list(head_names)
    if isinstance(config, AdapterConfig):
        return add_adapters(model, config)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        linear_names = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(
            f"peft could not adapt {type(model).__name__}: {err}"
            f" HINT: set `target_modules` in `peft` to some of the model's Linear layers: {linear_names}."
        ) from err


def collect_rng_states() -> dict[str, Any]:
    """The states of the global generators (torch, CUDA, numpy, random) as plain data (``weights_only`` loads it).

    Example::

        >>> states = collect_rng_states()
        >>> first = torch.rand(2)
        >>> restore_rng_states(states)
        >>> torch.equal(torch.rand(2), first)
        True
    """
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), position, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Set the global generators to states from :func:`collect_rng_states` (missing entries are left alone).

    Example::

        >>> restore_rng_states(collect_rng_states())  # continue exactly where the states were taken
    """
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "numpy" in states:
        kind, keys, position, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Return every parameter of ``module`` with ``requires_grad=True``, in registration order."""
    return [p for p in module.parameters() if p.requires_grad]


class OptimizedModule(pl.LightningModule):
    """Optimizer and scheduler set-up shared by the ready modules (classifiers and causal LMs), and FSDP2 sharding.

    A subclass stores its network as ``self.model``. Under FSDP2 (Lightning's ``ModelParallelStrategy``),
    :meth:`configure_model` shards each block of the network (found by :func:`~lightning_peft.layers.find_layers`)
    and then the network itself with ``fully_shard``: a YAML file only has to name the strategy.

    Args:
        optimizer: Builds the optimizer from an iterable of parameters.
        scheduler: Builds a learning-rate scheduler from the optimizer, stepped after every optimizer step
            (``ReduceLROnPlateau`` is stepped per epoch on ``val/loss``).
    """

    def __init__(self, optimizer: OptimizerCallable, scheduler: LRSchedulerCallable | None = None) -> None:
        super().__init__()
        if not callable(optimizer):
            raise TypeError(
                f"`optimizer` must be a callable that builds an optimizer from parameters, got {optimizer!r}."
                " HINT: pass a class such as `torch.optim.AdamW` or `functools.partial(torch.optim.AdamW, lr=1e-4)`."
            )
        if scheduler is not None and not callable(scheduler):
            raise TypeError(
                f"`scheduler` must be None or a callable that builds a scheduler from the optimizer, got {scheduler!r}."
                " HINT: pass e.g. `functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=1000)`."
            )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    @override
    def configure_model(self) -> None:
        """Shard the blocks, then the whole network, with FSDP2's ``fully_shard`` (only under FSDP2).

        Raises:
            ValueError: if the strategy's device mesh gives devices to tensor parallelism, for which these
                modules have no plan.
        """
        mesh = self.device_mesh  # set by ModelParallelStrategy only
        if mesh is None or _is_fully_sharded(self.model):
            return
        from torch.distributed.fsdp import fully_shard

        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                f"{type(self).__name__} shards its network for data parallelism only (FSDP2), but the strategy gives"
                f" {mesh['tensor_parallel'].size()} devices to tensor parallelism, so every device would train on the"
                " same data. HINT: `ModelParallelStrategy(data_parallel_size=<number of devices>,"
                " tensor_parallel_size=1)` (Lightning's default gives a node's devices to tensor parallelism)."
            )
        data_parallel = mesh["data_parallel"] if "data_parallel" in names else mesh
        for block in find_layers(self.model).blocks:
            fully_shard(block, mesh=data_parallel)
        fully_shard(self.model, mesh=data_parallel)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Dropout (and augmentation in the main process) draw from the global generators: a resumed run continues
        # bit for bit only if they continue where the checkpoint left them
        checkpoint["rng_states"] = collect_rng_states()
        # which class rebuilds this module (`lightning-peft export` and `export_checkpoint` read it)
        checkpoint["module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint written after EarlyPruning holds smaller weights: reach its architecture before they load
        # (Lightning calls this hook right before `load_state_dict`, in `load_from_checkpoint` and for `ckpt_path`).
        restore_pruned_architecture(self, checkpoint)
        if "rng_states" in checkpoint and attached_trainer(self) is not None and self.trainer.state.fn == "fit":
            restore_rng_states(checkpoint["rng_states"])

    @override
    def configure_optimizers(self) -> Any:
        # Built over everything trainable *now*: callbacks that freeze layers do so after this point and need
        # every candidate parameter in the optimizer to unfreeze it later.
        params = trainable_parameters(self)
        if not params:
            raise RuntimeError(
                f"{type(self).__name__} has no parameter with requires_grad=True to optimize."
                " HINT: do not freeze the whole model before `Trainer.fit`; let a callback freeze layers instead."
            )
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler_config = {"scheduler": scheduler, "interval": "epoch", "monitor": "val/loss"}
        else:
            scheduler_config = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler_config}


def _is_fully_sharded(module: nn.Module) -> bool:
    # `configure_model` runs for every Trainer entry point (fit, validate, ...): shard once
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


class ClassifierModule(OptimizedModule):
    """Steps, accuracy metrics and optimizer set-up shared by the classifiers; subclasses give the logits.

    A subclass stores its network as ``self.model`` and implements :meth:`logits_and_labels`.

    Args:
        num_classes: Number of classes of the accuracy metrics.
        optimizer: Builds the optimizer from an iterable of parameters.
        scheduler: Builds a learning-rate scheduler from the optimizer, stepped after every optimizer step
            (``ReduceLROnPlateau`` is stepped per epoch on ``val/loss``).
    """

    def __init__(
        self, num_classes: int, optimizer: OptimizerCallable, scheduler: LRSchedulerCallable | None = None
    ) -> None:
        super().__init__(optimizer, scheduler)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def logits_and_labels(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Run the network on a batch and return ``(logits, labels)``."""
        raise NotImplementedError

    def compute_loss(self, batch: Any) -> Tensor:
        """The cross-entropy loss of a batch, without logging or metric updates (IST scores layers with it)."""
        logits, labels = self.logits_and_labels(batch)
        return F.cross_entropy(logits, labels)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        logits, labels = self.logits_and_labels(batch)
        loss = F.cross_entropy(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits, labels = self.logits_and_labels(batch)
        self.val_acc(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The logits of a batch; its labels, when it has them, are ignored."""
        if isinstance(batch, Mapping):
            return self(**{k: v for k, v in batch.items() if k != "labels"})
        return self(batch[0]) if isinstance(batch, (tuple, list)) else self(batch)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        logits, labels = self.logits_and_labels(batch)
        self.test_acc(logits, labels)
        self.log("test/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.log("test/acc", self.test_acc, on_epoch=True)
