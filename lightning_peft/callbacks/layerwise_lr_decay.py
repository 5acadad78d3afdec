"""Layer-wise learning-rate decay: each block's learning rate shrinks with its depth from the top (BEiT, timm)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_peft._validation import check_bool, check_number
from lightning_peft.layout.depth import DepthGroups, depth_groups

__all__ = ["LayerwiseLRDecay", "LayerwiseLRDecayPlan"]

# Learning rates a param group or a scheduler holds per group: scaled by the group's factor when the groups split.
_GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
_SCHEDULER_SCALED = ("base_lrs", "_last_lr", "max_lrs", "min_lrs")
# Per-group entries of torch's schedulers that are not learning rates: repeated for every part of a split group.
_SCHEDULER_REPEATED = ("lr_lambdas", "base_momentums", "max_momentums")


@dataclass(frozen=True)
class LayerwiseLRDecayPlan:
    """The factor of every parameter's learning rate: :meth:`LayerwiseLRDecay.preview`.

    Attributes:
        factors: parameter name to ``decay ** depth`` (1 for the head, ``decay ** (L + 1)`` for the embeddings).
        depths: parameter name to depth from the top (0: head and what follows the last block).
        n_blocks: the number of blocks (L).
    """

    factors: Mapping[str, float]
    depths: Mapping[str, int]
    n_blocks: int

    @property
    def trainable(self) -> frozenset[str]:
        """Every parameter: the decay changes how fast parameters learn, not which ones do."""
        return frozenset(self.factors)


class LayerwiseLRDecay(Callback):
    """Layer-wise learning-rate decay: a parameter's learning rate is ``lr * decay ** depth``, depth from the top.

    Paper: Bao et al. 2021, "BEiT: BERT Pre-Training of Image Transformers", https://arxiv.org/abs/2106.08254
    (layer-wise learning-rate decay when fine-tuning; timm's ``param_groups_layer_decay``); ULMFiT's discriminative
    fine-tuning (https://arxiv.org/abs/1801.06146) is the same rule with ``decay=1/2.6``.

    Depth 0 is the head and everything registered after the last block (final norm, pooler): factor 1. The top
    block has depth 1, the bottom one depth L, the embeddings (everything before the first block, a timm model's
    stem) depth L + 1, the smallest factor. The blocks are timm's ``group_matcher`` groups where the model declares
    them, else the layout registry's (:func:`lightning_peft.layout.depth.depth_groups`); several stacks count as one
    column from the output down.

    The optimizer comes from your ``configure_optimizers``, over every parameter, in as many groups as you like
    (e.g. with and without weight decay). Once, at ``on_fit_start`` -- after the optimizer and its schedulers are
    built, before the first step and before a checkpoint's state loads -- each param group is split into one group
    per depth, with the same hyperparameters and its learning rates (``lr``, ``initial_lr``, ``max_lr``,
    ``min_lr``) multiplied by the depth's factor; every LR scheduler of that optimizer gets the same split of its
    per-group lists (``base_lrs``, ``lr_lambdas``, ``max_lrs``, ``min_lrs``, ... of torch's schedulers and of those
    built on them, as transformers' warm-up schedules are). So any scheduler keeps working: after N steps a
    parameter's learning rate is ``base_lr * schedule(N) * decay ** depth``. Absolute floors that a scheduler holds
    as one number for all groups (``CosineAnnealingLR``'s ``eta_min``) are not scaled. A resumed run splits the
    same way before the checkpoint's optimizer and scheduler state loads, so it continues exactly. Nothing is frozen
    and no gradient skipped: DDP needs no ``find_unused_parameters``, and FSDP2 works as without it. It composes
    with the methods that choose what trains (LISA, Half Fine-Tuning, :class:`GradualUnfreezing`): they never add
    or remove param groups.

    Args:
        decay: the factor per block, in (0, 1] (BEiT / timm fine-tuning use 0.65 to 0.75 for ViT-B; 1 is no decay).
        layers: dotted path of the block container, or a list of paths, when the automatic search picks the wrong
            ones (``"model.layers"``).
        verbose: print the factor of every depth and how many parameters it has when the groups split.

    Raises:
        ValueError: for a ``decay`` outside (0, 1] (at construction); at fit start, for an optimizer whose groups
            already carry timm's ``lr_scale`` (a layer decay of its own), or a scheduler of a class outside
            ``torch.optim.lr_scheduler`` that keeps other per-group lists it cannot know how to split.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_peft.callbacks import LayerwiseLRDecay
        >>> trainer = pl.Trainer(callbacks=[LayerwiseLRDecay(decay=0.75)], logger=False)

    In a LightningCLI YAML file::

        trainer:
          callbacks:
            - class_path: LayerwiseLRDecay
              init_args: {decay: 0.75}
    """

    def __init__(self, decay: float = 0.75, layers: str | list[str] | None = None, verbose: bool = False) -> None:
        check_number(
            "decay", decay, 0.0, 1.0, "BEiT fine-tunes ViT-B with 0.65, timm recipes use 0.65 to 0.75.",
            "a number in (0, 1]", include_high=True,
        )  # fmt: skip
        check_bool("verbose", verbose)
        self.decay = float(decay)
        self.layers = layers
        self.verbose = verbose
        self.groups: DepthGroups | None = None
        self._loaded_decay: float | None = None

    def factor(self, depth: int) -> float:
        """``decay ** depth``."""
        return self.decay**depth

    def preview(self, module: nn.Module) -> LayerwiseLRDecayPlan:
        """The factor of every parameter of ``module``, without a Trainer.

        Example::

            >>> from torch import nn
            >>> net = nn.Sequential(nn.Linear(4, 4), nn.ModuleList(nn.Linear(4, 4) for _ in range(2)), nn.Linear(4, 2))
            >>> plan = LayerwiseLRDecay(decay=0.5, layers="1").preview(net)
            >>> [plan.factors[n] for n in ("2.weight", "1.1.weight", "1.0.weight", "0.weight")]
            [1.0, 0.5, 0.25, 0.125]
        """
        groups = depth_groups(module, self.layers)
        depths = groups.depth_of()
        return LayerwiseLRDecayPlan({n: self.factor(d) for n, d in depths.items()}, depths, groups.n_blocks)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.groups = depth_groups(pl_module, self.layers)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.groups is None:
            self.groups = depth_groups(pl_module, self.layers)
        depth_of = self.groups.depth_of()
        depths = {id(p): depth_of[n] for n, p in pl_module.named_parameters() if n in depth_of}
        for optimizer in trainer.optimizers:
            self._check_optimizer(optimizer)
            parts = _split_param_groups(optimizer, lambda p: depths.get(id(p), 0), self.factor)
            for config in trainer.lr_scheduler_configs:
                if _optimizer_of(config.scheduler) is optimizer:
                    _split_scheduler(config.scheduler, parts, self.factor)
        if self.verbose:
            counts: dict[int, int] = {}
            for name, param in pl_module.named_parameters():
                counts[depth_of.get(name, 0)] = counts.get(depth_of.get(name, 0), 0) + param.numel()
            table = ", ".join(f"depth {d}: x{self.factor(d):.3g} ({counts[d]:,} params)" for d in sorted(counts))
            rank_zero_info(f"LayerwiseLRDecay (decay {self.decay}): {table}")

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if any("lr_scale" in group for group in optimizer.param_groups):
            raise ValueError(
                f"`LayerwiseLRDecay` would decay the learning rates of {type(optimizer).__name__} a second time: its"
                " param groups carry timm's `lr_scale` (built by `param_groups_layer_decay` / `create_optimizer_v2("
                "layer_decay=...)`). HINT: build the optimizer over `model.parameters()` and let LayerwiseLRDecay"
                " decay, or drop the callback."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("decay")
        if saved is not None and float(saved) != self.decay:
            rank_zero_warn(
                f"LayerwiseLRDecay: the checkpoint was trained with `decay={saved}`, this callback has"
                f" `decay={self.decay}`; the optimizer's and schedulers' learning rates load from the checkpoint, so"
                f" the run continues with decay {saved}. HINT: resume with the same decay, or start a new run."
            )


def _optimizer_of(scheduler: Any) -> torch.optim.Optimizer | None:
    optimizer = getattr(scheduler, "optimizer", None)
    return getattr(optimizer, "optimizer", optimizer) if optimizer is not None else None


def _split_param_groups(optimizer: torch.optim.Optimizer, depth: Any, factor: Any) -> list[list[tuple[int, int]]]:
    """Split every param group of ``optimizer`` into one group per depth, in place; scale its learning rates.

    Args:
        optimizer: a torch optimizer, before its first step.
        depth: parameter to depth.
        factor: depth to learning-rate factor.

    Returns:
        For each former group, its parts as ``(new group index, depth)``, in order.
    """
    new_groups: list[dict[str, Any]] = []
    parts: list[list[tuple[int, int]]] = []
    for group in optimizer.param_groups:
        by_depth: dict[int, list[nn.Parameter]] = {}
        for param in group["params"]:
            by_depth.setdefault(depth(param), []).append(param)
        group_parts = []
        for d in sorted(by_depth):
            part = {k: v for k, v in group.items() if k != "params"}
            for key in _GROUP_LR_KEYS:
                if key in part and part[key] is not None:
                    part[key] = part[key] * factor(d)
            part["params"] = by_depth[d]
            group_parts.append((len(new_groups), d))
            new_groups.append(part)
        parts.append(group_parts)
    optimizer.param_groups[:] = new_groups  # in place: wrappers that hold the list see the split
    return parts


def _split_scheduler(scheduler: Any, parts: list[list[tuple[int, int]]], factor: Any) -> None:
    """Give ``scheduler`` (and the schedulers it chains) the split of :func:`_split_param_groups`.

    Raises:
        ValueError: for a scheduler outside ``torch.optim.lr_scheduler`` with a per-group list it does not know.
    """
    for inner in getattr(scheduler, "_schedulers", None) or ():
        _split_scheduler(inner, parts, factor)
    n_old = len(parts)
    known = set(_SCHEDULER_SCALED) | set(_SCHEDULER_REPEATED)
    for key, value in list(vars(scheduler).items()):
        if not isinstance(value, (list, tuple)) or len(value) != n_old:
            continue
        if key in _SCHEDULER_SCALED:
            setattr(scheduler, key, [value[i] * factor(d) for i, group in enumerate(parts) for _, d in group])
        elif key in _SCHEDULER_REPEATED:
            setattr(scheduler, key, [value[i] for i, group in enumerate(parts) for _ in group])
        elif (
            key not in known
            and not type(scheduler).__module__.startswith("torch.optim")
            and n_old != sum(map(len, parts))
        ):
            raise ValueError(
                f"`LayerwiseLRDecay` splits the optimizer's {n_old} param group(s) into {sum(map(len, parts))}, but"
                f" the scheduler {type(scheduler).__name__} keeps a per-group list `{key}` it cannot know how to"
                " split. HINT: build the schedule on torch's schedulers (LambdaLR takes any function of the step),"
                " or split the groups by depth in `configure_optimizers` yourself."
            )
