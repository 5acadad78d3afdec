"""The LightningModule base classes of the ready modules.

:class:`OptimizedModule` owns the optimizer and scheduler set-up, FSDP2 sharding and the checkpoint hooks;
:class:`ClassifierModule` adds the steps and accuracy metrics every classifier shares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_peft._compat import attached_trainer
from lightning_peft._validation import check_callable
from lightning_peft.layout import find_blocks
from lightning_peft.modules._rng import collect_rng_states, restore_rng_states
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


def parameters_requiring_grad(module: nn.Module) -> list[nn.Parameter]:
    """Return every parameter of ``module`` with ``requires_grad=True``, in registration order.

    What the optimizer is built over; not the trainable set of a method, which the controller's participants give
    as names (:meth:`~lightning_peft.trainable.TrainableSetCallback.trainable_parameters`).

    Example::

        >>> from torch import nn
        >>> layer = nn.Linear(2, 2)
        >>> _ = layer.bias.requires_grad_(False)
        >>> [p.shape for p in parameters_requiring_grad(layer)]
        [torch.Size([2, 2])]
    """
    return [p for p in module.parameters() if p.requires_grad]


class OptimizedModule(pl.LightningModule):
    """Optimizer and scheduler set-up shared by the ready modules (classifiers and causal LMs), and FSDP2 sharding.

    A subclass stores its network as ``self.model``. Under FSDP2 (Lightning's ``ModelParallelStrategy``),
    :meth:`configure_model` shards each block of the network (found by :func:`~lightning_peft.layout.find_blocks`)
    and then the network itself with ``fully_shard``: a YAML file only has to name the strategy.

    Args:
        optimizer: Builds the optimizer from an iterable of parameters.
        scheduler: Builds a learning-rate scheduler from the optimizer, stepped after every optimizer step
            (``ReduceLROnPlateau`` is stepped per epoch on ``val/loss``).
    """

    def __init__(self, optimizer: OptimizerCallable, scheduler: LRSchedulerCallable | None = None) -> None:
        super().__init__()
        check_callable(
            "optimizer",
            optimizer,
            "a callable that builds an optimizer from parameters",
            "pass a class such as `torch.optim.AdamW` or `functools.partial(torch.optim.AdamW, lr=1e-4)`.",
        )
        check_callable(
            "scheduler",
            scheduler,
            "a callable that builds a scheduler from the optimizer",
            "pass e.g. `functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=1000)`.",
            allow_none=True,
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
        for block in find_blocks(self.model).blocks:
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
        params = parameters_requiring_grad(self)
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
