"""Half Fine-Tuning: train half of the parameters, keep the other half at its pre-trained values."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_peft._sharding import gather_whole, local_part, take_local
from lightning_peft._validation import check_bool, check_choice, check_int, check_number, check_seed
from lightning_peft.layout import find_blocks, find_head
from lightning_peft.trainable import TrainableSetCallback, agree_seed

__all__ = ["HalfFineTuning"]

GRANULARITIES = ("category", "layer", "model")
RESETS = (None, "on_reselect", "on_train_end")
# Up to this many units of a category are chosen by trying every subset; above it, by a randomised greedy pass.
_EXHAUSTIVE_UNITS = 12


@dataclass(frozen=True)
class _Unit:
    """A parameter-owning module that is selected or frozen as a whole (weight and bias together)."""

    name: str
    category: str
    parameters: tuple[str, ...]
    numel: int


@dataclass(frozen=True)
class HalfFineTuningPlan:
    """What a draw of :class:`HalfFineTuning` trains, for the tools that inspect it (support matrix, estimate).

    Attributes:
        outside: parameters outside the blocks (embeddings, final norm, head; a stackless model's head as
            :func:`~lightning_peft.layout.find_head` finds it, else its last layer); they train.
        blocks: the parameter-owning units (``name``, ``category``, ``parameters``, ``numel``) of every block; one
            unit per layer when the model has no block stack.
        selected: the block parameters the draw lets train. With ``channels`` every layer is selected and trains on
            the rows of ``masks``.
        masks: row masks (dim 0, ``True``: the row trains) of the parameters trained in part.
        channels: whether the layers are split by output channels (no block stack, or blocks of one layer each,
            with ``granularity="category"``).
    """

    outside: tuple[str, ...]
    blocks: tuple[tuple[_Unit, ...], ...]
    selected: tuple[str, ...]
    masks: Mapping[str, Tensor]
    channels: bool

    @property
    def trainable(self) -> frozenset[str]:
        """Every parameter that trains, in whole or in part: those outside the blocks and the selected ones."""
        return frozenset(self.outside) | frozenset(self.selected)


class HalfFineTuning(TrainableSetCallback):
    """Half Fine-Tuning (HFT): in every block, train half of each parameter category and freeze the rest.

    Paper: Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language Models", https://arxiv.org/abs/2404.18466.

    The frozen half keeps its pre-trained values, which is what limits forgetting. Everything outside the block
    stack (embeddings, final norm, classification head) trains, unless the user's module froze it. Blocks are found
    by :func:`lightning_peft.layout.find_blocks` and their parameters sorted into categories by its roles
    (attention ``q/k/v/o/qkv``, MLP ``up/gate/down``, norms, other). Freezing goes through the shared
    :class:`~lightning_peft.trainable.TrainableSetController`: frozen parameters get no gradient and no optimizer
    state, and the method composes with the others (``[LISA(...), HalfFineTuning()]`` trains half of each sampled
    block).

    Granularities (the paper's ablation; ``"category"`` is its method):

    * ``"category"``: in every block, ``ratio`` of each category's parameters trains -- 2 of the 4 attention
      projections, 1 of 2 norms, half of the MLP matrices. A category whose count is odd (Llama's gate/up/down)
      alternates between rounding up and down across blocks, so the total over the stack is the ratio (the paper's
      "2 and 1"). Sizes count, not only numbers: within a category the choice is the subset of modules whose size
      is closest to ``ratio`` of the category, with the rounding carried from block to block within each stack
      (blocks visited in a random order; a model with several stacks, as a ResNet's stages or an encoder and a
      decoder, balances each stack on its own, so a small block never trains whole to even out a large one).
      **Fused projections**: timm's fused ``qkv`` (and other fused q/k/v weights) cannot be split by
      ``requires_grad``, which is per tensor; it is one module of three times the size of the output projection, so
      each block trains either ``qkv`` or the output projection, half of the blocks each, and the stack's attention
      parameters train at the ratio (per block 3/4 or 1/4 instead of 2/4 of them).
    * ``"layer"``: ``round(ratio * n_blocks)`` whole blocks, drawn at random.
    * ``"model"``: modules drawn at random anywhere in the stack, ignoring blocks and categories, until their size
      is closest to ``ratio`` of all block parameters.

    **Models without a repeated block stack** (a small CNN): the parameter-owning modules in registration order
    are the layers, and the last one is the head, which trains. ``"layer"`` and ``"model"`` choose among the other
    layers as above. ``"category"`` makes each layer its own category and trains ``ratio`` of its output channels
    (rows of the weight, with their bias entries), drawn at random per layer. The same holds for a stack whose
    blocks hold a single layer each (a VGG). ``requires_grad`` cannot express this, so the masks go to the
    controller as row masks (:meth:`trainable_rows`): it zeroes the gradients of the frozen rows and, after every
    optimizer step, writes the frozen rows back (undoing weight decay and momentum). Those layers keep their
    optimizer state; combined with another method (LISA), a layer that method freezes is frozen whole.

    **Stages.** Every ``fit`` call is a new stage (the paper's SFT / DPO stage, or a new task of continual
    learning) and draws a fresh selection; with ``reselect_every_n_epochs`` it also draws again every n epochs. The
    draws come from one generator seeded once (``seed``, else the ``seed_everything`` seed, else random; rank 0's
    seed is used by every rank), so a seeded sequence of stages is reproducible and each stage differs. A run
    resumed from a checkpoint (``fit(ckpt_path=...)``) continues its stage with the same selection.

    **Reset** (the paper's Half-Reset): copy the pre-trained values back into the parameters the current
    selection freezes -- with ``"on_reselect"`` at every draw (so during training the frozen half always holds the
    pre-trained values, even if an earlier selection trained it), with ``"on_train_end"`` once at the end of every
    ``fit``. The pre-trained values are those at the start of the *first* ``fit``, copied to CPU memory (one copy of
    the block parameters that may train; what the module froze, such as a peft base model, is not copied). They
    are saved in the checkpoint with the callback's state, so a resumed run resets to the values of the original
    model, not to those at the time of the checkpoint; a checkpoint with reset enabled is larger by that copy.
    Without reset no copy is taken.

    State in the checkpoint: the selection, the stage counter, the epoch of the last draw, the generator state and,
    with reset, the pre-trained values.

    Args:
        ratio: fraction of each category (block, or of the stack) that trains, in (0, 1). The paper uses 0.5.
        granularity: ``"category"`` (the paper's method), ``"layer"`` or ``"model"``.
        reselect_every_n_epochs: draw a new selection every n epochs within a ``fit`` (``None``: once per ``fit``).
        reset: ``None``, ``"on_reselect"`` or ``"on_train_end"``: when to copy the pre-trained values back into
            the frozen parameters.
        seed: seed of the draws. ``None`` uses the ``seed_everything`` seed when one was set, else a random one.
        layers: dotted path of the block container, when the automatic search picks the wrong one
            (``"model.layers"``).
        verbose: print a summary of every draw.

    Raises:
        ValueError: if an argument is out of range (at construction); at setup, if ``granularity="layer"`` would
            train no block of the model, or if a model without a block stack (channel halves) runs under FSDP2.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_peft.callbacks import HalfFineTuning
        >>> trainer = pl.Trainer(callbacks=[HalfFineTuning(ratio=0.5)], max_steps=100, logger=False)

    In a LightningCLI YAML file::

        trainer:
          callbacks:
            - class_path: HalfFineTuning
              init_args: {ratio: 0.5, granularity: category}
    """

    def __init__(
        self,
        ratio: float = 0.5,
        granularity: str = "category",
        reselect_every_n_epochs: int | None = None,
        reset: str | None = None,
        seed: int | None = None,
        layers: str | list[str] | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(release_optimizer_state=True)
        check_number(
            "ratio",
            ratio,
            0,
            1,
            "the paper trains half of the parameters: ratio=0.5.",
            "a number strictly between 0 and 1 (the fraction that trains)",
        )
        check_choice(
            "granularity",
            granularity,
            GRANULARITIES,
            '"category" is the paper\'s method (half of each category in every block).',
        )
        check_int(
            "reselect_every_n_epochs",
            reselect_every_n_epochs,
            1,
            "None draws once per `fit` call (one stage), as in the paper.",
            allow_none=True,
        )
        check_choice(
            "reset", reset, RESETS, '"on_train_end" is the paper\'s Half-Reset; None keeps the trained values.'
        )
        check_seed("seed", seed)
        check_bool("verbose", verbose)
        self.ratio = float(ratio)
        self.granularity = granularity
        self.reselect_every_n_epochs = reselect_every_n_epochs
        self.reset = reset
        self.seed = seed
        self.layers = layers
        self.verbose = verbose
        # Selection and its bookkeeping (all in the checkpoint).
        self.stage = 0
        self.selected: list[str] | None = None  # parameter names the current draw lets train
        self.masks: dict[str, Tensor] = {}  # row masks (True = trains) of partially trained parameters
        self.history: list[dict[str, Any]] = []
        self._generator: torch.Generator | None = None
        self._drawn_epoch: int | None = None
        self._stage_start_epoch = 0
        self._pretrained: dict[str, Tensor] | None = None
        self._restored = False
        # Built at setup.
        self._blocks: list[list[_Unit]] = []
        self._block_stacks: list[str] = []  # the stack of each block: category balance is kept per stack
        self._outside: list[str] = []
        self._stackless = False
        self._allowed: frozenset[str] | None = None
        self._params: dict[str, nn.Parameter] = {}

    # ------------------------------------------------------------------------------------------------- set-up

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._find_units(pl_module)
        if self._stackless and self.granularity == "category" and isinstance(trainer.strategy, ModelParallelStrategy):
            raise ValueError(
                f"HalfFineTuning splits the channels of {type(pl_module).__name__} (it has no block stack) with"
                " gradient masks over whole parameters, which FSDP2's sharded parameters do not support. HINT: use"
                ' `strategy="ddp"`, `granularity="layer"`, or `layers=` with the path of a block container.'
            )
        if self.granularity == "layer":
            n_blocks = len(self._blocks)
            if round(self.ratio * n_blocks) < 1:
                raise ValueError(
                    f'`ratio={self.ratio}` with `granularity="layer"` trains round({self.ratio} x {n_blocks}) = 0'
                    f" of the model's {n_blocks} blocks. HINT: raise `ratio` to at least {0.5 / n_blocks:.3g}, or"
                    ' use granularity="category".'
                )
        if self._generator is None:  # not restored from a checkpoint
            self._generator = torch.Generator().manual_seed(agree_seed(trainer, self.seed))
        self._allowed = None
        super().setup(trainer, pl_module, stage)

    def _find_units(self, pl_module: nn.Module) -> None:
        named = dict(pl_module.named_parameters())
        try:
            stack = find_blocks(pl_module, self.layers)
        except ValueError:
            if self.layers is not None:
                raise
            stack = None
        if stack is not None and all(len(stack.units(i)) <= 1 for i in range(len(stack))):
            rank_zero_info(
                f"HalfFineTuning: every block of {type(pl_module).__name__} holds a single parameter layer (at"
                f" {stack.path!r}), which cannot be halved by whole tensors; splitting the layers by channels."
            )
            stack = None
        if stack is not None:
            self._stackless = False
            self._outside = stack.outside_parameter_names()
            self._blocks = []
            self._block_stacks = [stack.stack_of(i).path for i in range(len(stack))]
            for index in range(len(stack)):
                block = []
                for unit in stack.units(index):
                    numel = sum(named[p].numel() for p in unit.parameters)
                    block.append(_Unit(unit.name, unit.category, unit.parameters, numel))
                self._blocks.append(block)
            return
        # No repeated blocks: every parameter-owning module is a layer; the head (the layout registry's, else the
        # last layer) trains whole.
        owners: list[tuple[str, tuple[str, ...]]] = []
        for module_name, module in pl_module.named_modules():
            direct = [n for n, _ in module.named_parameters(recurse=False)]
            if direct:
                prefix = f"{module_name}." if module_name else ""
                owners.append((module_name, tuple(prefix + n for n in direct)))
        heads = find_head(pl_module)
        in_head = [any(name == h or name.startswith(f"{h}.") for h in heads) for name, _ in owners]
        if any(in_head):
            hidden = [owner for owner, inside in zip(owners, in_head, strict=True) if not inside]
            head = (
                ", ".join(heads),
                tuple(p for owner, inside in zip(owners, in_head, strict=True) if inside for p in owner[1]),
            )
        else:
            *hidden, head = owners or [("", ())]
        if not hidden:
            raise ValueError(
                f"HalfFineTuning found no repeated blocks in {type(pl_module).__name__} and no parameter-owning"
                " layer outside its head, so there is nothing to split. HINT: pass `layers=` with the dotted path"
                " of the block container."
            )
        self._stackless = True
        self._outside = list(head[1])
        self._block_stacks = []
        self._blocks = [
            [_Unit(name, "layer", params, sum(named[p].numel() for p in params))] for name, params in hidden
        ]
        rank_zero_info(
            f"HalfFineTuning: {type(pl_module).__name__} has no repeated block stack; its {len(hidden)} hidden"
            f" layers are split ({self.granularity!r} granularity) and {head[0]!r} trains whole as the head."
        )

    # ------------------------------------------------------------------------------------------------- stages

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._params = dict(pl_module.named_parameters())
        resumed = self._restored and self.selected is not None
        self._restored = False
        if self.reset is not None and self._pretrained is None:  # the first fit (or a checkpoint without them)
            # only what may train: parameters the user's module froze (a peft base model) never change
            # the local shard of a sharded (FSDP2) parameter; whole tensors only in checkpoints
            self._pretrained = {
                name: local_part(self._params[name]).detach().to("cpu", copy=True)
                for name in self._block_parameter_names()
                if self._params[name].requires_grad
            }
        if resumed:  # continue the checkpoint's stage with its selection
            return
        self.stage += 1
        self._stage_start_epoch = trainer.current_epoch
        self._draw(trainer.current_epoch)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # FSDP2 restores a checkpoint after `on_fit_start`: what it loaded is in place now (the selection drawn in
        # `on_fit_start` was replaced by the checkpoint's), and the next fit is a new stage
        self._restored = False

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.reselect_every_n_epochs
        epoch = trainer.current_epoch
        if n is None or epoch == self._drawn_epoch or (epoch - self._stage_start_epoch) % n != 0:
            return
        self._draw(epoch)

    @override
    def trainable_parameters(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> Set[str] | None:
        if self._allowed is None:
            assert self.selected is not None
            # every parameter of the module now but the unselected block parameters: parameters that other methods
            # registered after this one's setup (early pruning's masks) are outside the blocks and train
            selected = set(self.selected)
            frozen = {p for p in self._block_parameter_names() if p not in selected}
            self._allowed = self.names_except((n for n, _ in pl_module.named_parameters()), frozen)
        return self._allowed

    @override
    def trainable_rows(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> Mapping[str, Tensor] | None:
        # a new dict at every draw (and load), the same object in between: the controller re-holds only then
        return self.masks or None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reset == "on_train_end":
            self._reset_frozen()

    # ------------------------------------------------------------------------------------------------- plan

    def plan(self) -> HalfFineTuningPlan:
        """The current draw: what sits outside the blocks, the blocks' units, the selection and its row masks.

        Raises:
            ValueError: before the first draw (a ``fit`` draws in ``on_fit_start``; :meth:`preview` draws without).
        """
        if self.selected is None:
            raise ValueError(
                "HalfFineTuning has drawn no selection yet. HINT: read `plan()` once `fit` has started, or call"
                " `preview(module)` for the draw a `fit` would make."
            )
        return HalfFineTuningPlan(
            outside=tuple(self._outside),
            blocks=tuple(tuple(block) for block in self._blocks),
            selected=tuple(self.selected),
            masks=dict(self.masks),
            channels=self._stackless and self.granularity == "category",
        )

    def preview(self, module: nn.Module) -> HalfFineTuningPlan:
        """The first draw a ``fit`` of ``module`` would make with these arguments, without a Trainer.

        ``seed`` seeds it (0 when ``seed`` is None); this callback's own state is left untouched, so it can still be
        used for training. The memory estimate and the support matrix use it.
        """
        probe = HalfFineTuning(
            ratio=self.ratio, granularity=self.granularity, seed=self.seed, layers=self.layers, verbose=False
        )
        probe._find_units(module)
        probe._params = dict(module.named_parameters())
        probe._generator = torch.Generator().manual_seed(0 if self.seed is None else self.seed)
        probe._draw(0)
        return probe.plan()

    # ------------------------------------------------------------------------------------------------- draws

    def _block_parameter_names(self) -> list[str]:
        return [p for block in self._blocks for unit in block for p in unit.parameters]

    def _draw(self, epoch: int) -> None:
        assert self._generator is not None
        if self._stackless and self.granularity == "category":
            units = [unit for block in self._blocks for unit in block]
            self.masks = {}
            for unit in units:
                self.masks.update(self._row_masks(unit))
            chosen: list[_Unit] = units  # every layer trains, on a subset of its rows
        elif self.granularity == "category":
            chosen = self._draw_categories()
            self.masks = {}
        elif self.granularity == "layer":
            order = torch.randperm(len(self._blocks), generator=self._generator).tolist()
            picked = sorted(order[: round(self.ratio * len(self._blocks))])
            chosen = [unit for index in picked for unit in self._blocks[index]]
            self.masks = {}
        else:
            units = [unit for block in self._blocks for unit in block]
            chosen = [units[i] for i in self._closest_subset([u.numel for u in units], self.ratio * _total(units))]
            self.masks = {}
        self.selected = sorted(p for unit in chosen for p in unit.parameters)
        self._allowed = None
        self._drawn_epoch = epoch
        trained = sum(u.numel for u in chosen) if not self.masks else self._masked_numel()
        total = _total(u for block in self._blocks for u in block)
        self.history.append(
            {"stage": self.stage, "epoch": epoch, "trained_block_params": trained, "block_params": total}
        )
        if self.verbose:
            rank_zero_info(
                f"HalfFineTuning stage {self.stage}, epoch {epoch}: {self.granularity} selection trains"
                f" {trained:,} of {total:,} block parameters ({trained / max(total, 1):.1%})."
            )
        if self.reset == "on_reselect":
            self._reset_frozen()

    def _draw_categories(self) -> list[_Unit]:
        assert self._generator is not None
        chosen: list[_Unit] = []
        # per (stack, category): target so far minus chosen so far. Kept per stack, so a small block (a ResNet's
        # first stage) is never trained whole or frozen whole to balance the rounding of a large one (the last stage)
        carry: dict[tuple[str, str], float] = {}
        for index in torch.randperm(len(self._blocks), generator=self._generator).tolist():
            by_category: dict[str, list[_Unit]] = {}
            for unit in self._blocks[index]:
                by_category.setdefault(unit.category, []).append(unit)
            stack = self._block_stacks[index] if self._block_stacks else ""
            for category, units in by_category.items():
                size = _total(units)
                target = self.ratio * size + carry.get((stack, category), 0.0)
                picked = [units[i] for i in self._closest_subset([u.numel for u in units], target)]
                carry[stack, category] = target - _total(picked)
                chosen.extend(picked)
        return chosen

    def _closest_subset(self, sizes: list[int], target: float) -> list[int]:
        """Indices of a random subset of ``sizes`` whose sum is closest to ``target``."""
        assert self._generator is not None
        n = len(sizes)
        if n <= _EXHAUSTIVE_UNITS:
            best: list[tuple[int, ...]] = []
            best_distance = float("inf")
            tolerance = 1e-9 * max(sum(sizes), 1)
            # a category of two or more modules keeps at least one trained and one frozen in every block, whatever
            # the rounding carried from the blocks before (the paper halves each block)
            sizes_allowed = range(1, n) if n >= 2 else range(n + 1)
            for k in sizes_allowed:
                for combo in itertools.combinations(range(n), k):
                    distance = abs(sum(sizes[i] for i in combo) - target)
                    if distance < best_distance - tolerance:
                        best, best_distance = [combo], distance
                    elif distance <= best_distance + tolerance:
                        best.append(combo)
            pick = int(torch.randint(len(best), (1,), generator=self._generator))
            return list(best[pick])
        picked, total = [], 0
        order = torch.randperm(n, generator=self._generator).tolist()
        for i in order:
            if len(picked) < n - 1 and abs(total + sizes[i] - target) < abs(total - target):
                picked.append(i)
                total += sizes[i]
        return sorted(picked) or [order[0]]

    def _row_masks(self, unit: _Unit) -> dict[str, Tensor]:
        """Row masks (dim 0: output channels) of a layer; parameters with the same number of rows share one."""
        assert self._generator is not None
        masks: dict[str, Tensor] = {}
        by_rows: dict[int, Tensor] = {}
        for name in unit.parameters:
            rows = self._params[name].shape[0] if self._params[name].dim() else 1
            if rows not in by_rows:
                keep = torch.zeros(rows, dtype=torch.bool)
                keep[torch.randperm(rows, generator=self._generator)[: round(self.ratio * rows)]] = True
                by_rows[rows] = keep
            masks[name] = by_rows[rows]
        return masks

    def _masked_numel(self) -> int:
        return sum(int(mask.sum()) * (self._params[n].numel() // mask.numel()) for n, mask in self.masks.items())

    # ------------------------------------------------------------------------------------------------- reset

    def frozen_parameter_names(self) -> list[str]:
        """Block parameters the current selection freezes entirely (partially trained ones are in ``masks``)."""
        chosen = set(self.selected or ())
        return [p for p in self._block_parameter_names() if p not in chosen]

    @torch.no_grad()
    def _reset_frozen(self) -> None:
        if self._pretrained is None:
            return
        for name in self.frozen_parameter_names():
            if name not in self._pretrained:
                continue
            param = self._params[name]
            local = local_part(param)
            self._pretrained[name] = take_local(param, self._pretrained[name])  # whole, if read from a checkpoint
            local.copy_(self._pretrained[name].to(device=local.device, dtype=local.dtype))
        for name, mask in self.masks.items():
            if name not in self._pretrained:
                continue
            param = self._params[name]
            pretrained = self._pretrained[name].to(device=param.device, dtype=param.dtype)
            param.copy_(torch.where(_expand(mask.to(param.device), param), param, pretrained))

    # ------------------------------------------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "selected": self.selected,
            "masks": {name: mask.clone() for name, mask in self.masks.items()},
            "drawn_epoch": self._drawn_epoch,
            "stage_start_epoch": self._stage_start_epoch,
            "generator": None if self._generator is None else self._generator.get_state(),
            "history": self.history,
            "pretrained": None
            if self._pretrained is None
            else {
                name: gather_whole(self._params[name], take_local(self._params[name], value))
                if name in self._params
                else value
                for name, value in self._pretrained.items()
            },
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage = int(state_dict.get("stage", 0))
        selected = state_dict.get("selected")
        self.selected = None if selected is None else list(selected)
        self.masks = {name: mask.to(torch.bool) for name, mask in (state_dict.get("masks") or {}).items()}
        self._drawn_epoch = state_dict.get("drawn_epoch")
        self._stage_start_epoch = int(state_dict.get("stage_start_epoch", 0))
        self.history = list(state_dict.get("history", []))
        generator_state = state_dict.get("generator")
        if generator_state is not None:
            self._generator = torch.Generator()
            self._generator.set_state(generator_state)
        pretrained = state_dict.get("pretrained")
        if pretrained is not None:
            self._pretrained = {name: value.to("cpu") for name, value in pretrained.items()}
        elif self.reset is not None:
            rank_zero_warn(
                "HalfFineTuning: the checkpoint holds no pre-trained values (saved without `reset`); the values at"
                " the start of this run are used for resets from now on."
            )
        self._restored = True
        self._allowed = None


def _total(units: Any) -> int:
    return sum(unit.numel for unit in units)


def _expand(mask: Tensor, param: Tensor) -> Tensor:
    """A row mask shaped to broadcast over ``param`` (rows along dim 0)."""
    return mask.view(-1, *([1] * (param.dim() - 1))) if param.dim() else mask.view(())
