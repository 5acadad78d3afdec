"""Gradual unfreezing: the head first, then one block after another from the top down (ULMFiT)."""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_peft._validation import check_bool, check_choice, check_int
from lightning_peft.layout.depth import DepthGroups, depth_groups
from lightning_peft.trainable import TrainableSetCallback

__all__ = ["GradualUnfreezing", "GradualUnfreezingPlan"]


@dataclass(frozen=True)
class GradualUnfreezingPlan:
    """What :class:`GradualUnfreezing` trains at each stage, for the tools that inspect it (estimate, support).

    Attributes:
        stages: the parameter names that train at each stage; stage 0 is the head (and what follows the last
            block), each later stage adds ``blocks_per_stage`` blocks, the last one the embeddings (unless they
            never train).
        n_blocks: the number of blocks of the model.
        trainable: the largest set, the last stage's: what trains once the schedule has run (the memory estimate's
            peak).
    """

    stages: tuple[frozenset[str], ...]
    n_blocks: int

    @property
    def trainable(self) -> frozenset[str]:
        """The last stage's set."""
        return self.stages[-1]


class GradualUnfreezing(TrainableSetCallback):
    """Gradual unfreezing: train the head first, then unfreeze the blocks one stage at a time from the top down.

    Paper: Howard and Ruder 2018, "Universal Language Model Fine-tuning for Text Classification" (ULMFiT),
    https://arxiv.org/abs/1801.06146: "we first unfreeze the last layer and fine-tune all unfrozen layers for one
    epoch. We then unfreeze the next lower frozen layer and repeat".

    Stage 0 trains the head and everything registered after the last block (final norm, pooler); every
    ``unfreeze_every`` steps or epochs (``unit``), or at each of ``milestones``, the next ``blocks_per_stage``
    blocks below join; with ``embeddings="last"`` the embeddings (everything before the first block) join one stage
    after the bottom block, with ``"never"`` they stay frozen. The blocks and the head come from the layout
    registry (:func:`lightning_peft.layout.depth.depth_groups`: timm's ``group_matcher``, transformers'
    ``_no_split_modules``, ...); a model with several stacks unfreezes them as one column from the output down (the
    decoder before the encoder). A weight the head shares with the embeddings trains with the head.

    Unlike Lightning's ``BackboneFinetuning`` it never touches ``requires_grad`` or the param groups itself: it
    tells the shared :class:`~lightning_peft.trainable.TrainableSetController` what may train, which changes the set
    only between optimizer steps, gives a block that joins fresh optimizer state, keeps one LR schedule, tells DDP
    about the frozen parameters on its own (no ``find_unused_parameters`` to set), works under FSDP2, and resumes
    mid-schedule exactly: the stage is a function of the step (or epoch) alone. It composes with LISA, Half
    Fine-Tuning, IST and :class:`~lightning_peft.callbacks.LayerwiseLRDecay` (ULMFiT's discriminative learning
    rates): a parameter trains only if every method allows it. Build the optimizer over every parameter.

    Args:
        unfreeze_every: steps or epochs (``unit``) between two stages. ``None`` with no ``milestones``: 1 (ULMFiT's
            one epoch per stage).
        unit: ``"steps"`` (optimizer steps) or ``"epochs"``; the unit of ``unfreeze_every`` and ``milestones``.
        milestones: the steps or epochs at which each next stage begins, strictly increasing (instead of
            ``unfreeze_every``); stages beyond the list never begin.
        blocks_per_stage: blocks that join at each stage.
        embeddings: ``"last"``: the embeddings join one stage after the bottom block; ``"never"``: they stay frozen.
        layers: dotted path of the block container, or a list of paths, when the automatic search picks the wrong
            ones (``"model.layers"``).
        verbose: print the stage and what it trains whenever a stage begins.

    Raises:
        ValueError: at construction, for an ``unfreeze_every`` or ``blocks_per_stage`` below 1, a ``unit`` or
            ``embeddings`` not among the allowed values, ``milestones`` that are not strictly increasing integers
            >= 1, or both ``unfreeze_every`` and ``milestones``; at setup, for more ``milestones`` than the model has
            stages, or a model with nothing after its last block to train first (no head found).

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_peft.callbacks import GradualUnfreezing
        >>> trainer = pl.Trainer(callbacks=[GradualUnfreezing(unfreeze_every=50, unit="steps")], logger=False)

    In a LightningCLI YAML file::

        trainer:
          callbacks:
            - class_path: GradualUnfreezing
              init_args: {unfreeze_every: 50, unit: steps}
    """

    def __init__(
        self,
        unfreeze_every: int | None = None,
        unit: Literal["steps", "epochs"] = "epochs",
        milestones: list[int] | None = None,
        blocks_per_stage: int = 1,
        embeddings: Literal["last", "never"] = "last",
        layers: str | list[str] | None = None,
        verbose: bool = False,
    ) -> None:
        # a parameter that trained never freezes again here: no state of ours to release, and a method composed with
        # this one (LISA with `release_optimizer_state=False`) keeps its own choice
        super().__init__(release_optimizer_state=False)
        check_choice("unit", unit, ("steps", "epochs"), 'e.g. `unfreeze_every: 50, unit: "steps"`.')
        check_choice("embeddings", embeddings, ("last", "never"), '"last" unfreezes them after the bottom block.')
        check_int("blocks_per_stage", blocks_per_stage, 1, "1 unfreezes one block per stage, as ULMFiT does.")
        check_bool("verbose", verbose)
        if unfreeze_every is not None and milestones is not None:
            raise ValueError(
                f"`unfreeze_every` and `milestones` cannot both be given, got unfreeze_every={unfreeze_every!r} and"
                f" milestones={milestones!r}. HINT: a regular schedule (`unfreeze_every`) or an explicit one"
                " (`milestones`), not both."
            )
        if milestones is not None:
            if (
                isinstance(milestones, (str, bytes))
                or not isinstance(milestones, (list, tuple))
                or not milestones
                or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones)
                or any(b <= a for a, b in zip(milestones, milestones[1:], strict=False))
            ):
                raise ValueError(
                    f"`milestones` must be a non-empty list of strictly increasing integers >= 1 (the {unit} at which"
                    f" each next stage begins), got {milestones!r}. HINT: e.g. `milestones: [100, 200, 400]`."
                )
            milestones = list(milestones)
        else:
            unfreeze_every = 1 if unfreeze_every is None else unfreeze_every
            check_int("unfreeze_every", unfreeze_every, 1, f"the {unit} between two stages, e.g. 1 epoch or 50 steps.")
        self.unfreeze_every = unfreeze_every
        self.unit = unit
        self.milestones = milestones
        self.blocks_per_stage = blocks_per_stage
        self.embeddings = embeddings
        self.layers = layers
        self.verbose = verbose
        self.groups: DepthGroups | None = None
        self.stage: int | None = None
        self.history: list[tuple[int, int]] = []
        self._frozen_by_stage: list[frozenset[str]] = []
        self._allowed: frozenset[str] | None = None

    # ------------------------------------------------------------------------------------------------ stages

    @property
    def n_stages(self) -> int:
        """The number of stages of the model found at setup (stage 0 included)."""
        if self.groups is None:
            raise RuntimeError("`n_stages` is known once the callback was set up (or use `preview(model)`).")
        return len(self._stages(self.groups))

    def _stages(self, groups: DepthGroups) -> list[tuple[str, ...]]:
        """The parameter names each stage adds: the top, blocks ``blocks_per_stage`` at a time, the embeddings."""
        blocks = groups.groups[1 : groups.n_blocks + 1]
        per = self.blocks_per_stage
        stages = [groups.top]
        stages += [tuple(n for g in blocks[i : i + per] for n in g) for i in range(0, len(blocks), per)]
        if self.embeddings == "last" and groups.embeddings:
            stages.append(groups.embeddings)
        return stages

    def _checked_groups(self, module: nn.Module) -> DepthGroups:
        groups = depth_groups(module, self.layers)
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        if not trainable & set(groups.top):
            raise ValueError(
                f"`GradualUnfreezing` trains the head first, but {type(module).__name__} has no trainable parameter"
                f" after its last block (blocks at {groups.stack.path!r}, head found: none). HINT: give the model a"
                " head after the blocks, or pass `layers=` if other containers hold the blocks."
            )
        n_stages = len(self._stages(groups))
        if self.milestones is not None and len(self.milestones) > n_stages - 1:
            raise ValueError(
                f"`milestones` must have at most {n_stages - 1} entries (the model has {n_stages} stages: the head,"
                f" then {groups.n_blocks} blocks {self.blocks_per_stage} at a time, then the embeddings unless"
                f" `embeddings='never'`), got {len(self.milestones)}. HINT: drop the last"
                f" {len(self.milestones) - n_stages + 1}, or unfreeze fewer blocks per stage."
            )
        return groups

    def _frozen(self, groups: DepthGroups) -> list[frozenset[str]]:
        """For each stage, the names still frozen."""
        stages = self._stages(groups)
        frozen = [n for g in groups.groups for n in g]
        out = []
        for added in stages:
            gone = set(added)
            frozen = [n for n in frozen if n not in gone]
            out.append(frozenset(frozen))
        return out

    def stage_at(self, step: int, epoch: int) -> int:
        """The stage that trains at optimizer step ``step`` in epoch ``epoch`` (capped at the last stage)."""
        now = step if self.unit == "steps" else epoch
        if self.milestones is not None:
            stage = sum(1 for m in self.milestones if m <= now)
        else:
            assert self.unfreeze_every is not None
            stage = now // self.unfreeze_every
        last = len(self._frozen_by_stage) - 1 if self._frozen_by_stage else stage
        return min(stage, last)

    def preview(self, module: nn.Module) -> GradualUnfreezingPlan:
        """What each stage would train on ``module``, without a Trainer; the estimate and the support check ask.

        Raises:
            ValueError: as setup does, for a model these arguments do not fit.

        Example::

            >>> from torch import nn
            >>> net = nn.Sequential(nn.Linear(4, 4), nn.ModuleList(nn.Linear(4, 4) for _ in range(2)), nn.Linear(4, 2))
            >>> plan = GradualUnfreezing(unfreeze_every=10, unit="steps", layers="1").preview(net)
            >>> [sorted(s) for s in plan.stages][:2]
            [['2.bias', '2.weight'], ['1.1.bias', '1.1.weight', '2.bias', '2.weight']]
        """
        groups = self._checked_groups(module)
        every = frozenset(n for n, _ in module.named_parameters())
        return GradualUnfreezingPlan(tuple(every - f for f in self._frozen(groups)), groups.n_blocks)

    # ------------------------------------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.groups = self._checked_groups(pl_module)
        self._frozen_by_stage = self._frozen(self.groups)
        self._allowed = None
        self.stage = None
        super().setup(trainer, pl_module, stage)

    @override
    def trainable_parameters(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> Set[str] | None:
        stage = self.stage_at(step, trainer.current_epoch)
        if stage != self.stage or self._allowed is None:
            # every parameter of the module now but those still frozen: parameters other methods registered after
            # setup (early pruning's masks) train
            frozen = self._frozen_by_stage[stage]
            self._allowed = frozenset(n for n, _ in pl_module.named_parameters() if n not in frozen)
            if stage != self.stage:
                self.history.append((step, stage))
                if self.verbose:
                    assert self.groups is not None
                    blocks = min(stage * self.blocks_per_stage, self.groups.n_blocks)
                    embeddings = " and the embeddings" if not self._frozen_by_stage[stage] else ""
                    rank_zero_info(
                        f"GradualUnfreezing step {step}: stage {stage} of {len(self._frozen_by_stage) - 1}, the head"
                        f" and the top {blocks} of {self.groups.n_blocks} blocks{embeddings} train"
                    )
            self.stage = stage
        return self._allowed

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the stage follows from the step alone: what is restored is the record of when each stage began
        self.history = [(int(step), int(stage)) for step, stage in state_dict.get("history", [])]
        self.stage = state_dict.get("stage")
        self._allowed = None
