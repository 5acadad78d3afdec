"""EarlyPruning: estimate what matters in the first steps of a run, then make the model smaller and keep training."""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_peft._compat import (
    compile_wrappers_lifted,
    is_spawning_launcher,
    logger_writes_this_step,
    restart_weight_averaging,
    run_before_weights_load,
    undo_before_weights_load,
)
from lightning_peft._validation import check_bool, check_choice, check_int, check_number, check_seed
from lightning_peft.pruning import (
    PruningMasks,
    PruningPlan,
    apply_pruning_plan,
    carry_over,
    decision,
    find_sites,
    plan_applied,
    report,
)
from lightning_peft.pruning.estimation import MASKS, Estimation
from lightning_peft.pruning.surgery import Sites
from lightning_peft.trainable import agree_seed

__all__ = ["EarlyPruning"]

_ESTIMATION_KEYS = ("taylor", "importance", "adapter_importance")
_SCORES = ("taylor", "magnitude")
_MIN_SPREAD = 0.05  # below this coefficient of variation of the mask values, |m| ranks close to random


def _check_ratio(name: str, value: float, hint: str) -> float:
    return check_number(name, value, 0, 1, hint, "a number in [0, 1) (the fraction pruned; 0 turns it off)", True)


class EarlyPruning(Callback):
    """Light-PEFT early pruning: learn head/neuron masks and PEFT importance early, then prune physically.

    Paper: Gu et al. 2024, "Light-PEFT: Lightening Parameter-Efficient Fine-Tuning via Early Pruning",
    https://arxiv.org/abs/2406.03792.

    During the first ``estimation_steps`` optimizer steps:

    * **foundation masks** -- a trainable scalar per attention head (multiplying the head's output before the output
      projection, so fused / SDPA / flash attention need no change) and per MLP neuron (multiplying the input of the
      down projection), initialised to 1, trained by the run's own optimizer with whatever else trains, with an L1
      penalty ``l1 * sum(|m|)``. The masks are registered on the LightningModule (as ``early_pruning_masks``) in
      ``setup``, before ``configure_optimizers``, so an optimizer built over the module's trainable parameters
      includes them. The penalty is not added to the loss tensor: its gradient ``l1 * sign(m)`` is added to the
      masks' gradients in ``on_before_optimizer_step``, after gradient accumulation, DDP averaging and AMP
      unscaling -- the same update as adding the penalty to every micro-batch's loss, without touching the
      user's ``training_step``. It is logged as ``early_pruning/mask_l1``.
    * **PEFT importance** -- for each HF peft LoRA layer: the module score ``||ΔW x|| / ||W x||`` and the per-rank
      first-order Taylor score ``|Σ ∂L/∂A_i ⊙ A_i| + |Σ ∂L/∂B_i ⊙ B_i|``, averaged over the second half of the
      estimation steps; for the adapters of :mod:`lightning_peft.adapters` the same scores with the adapter's
      correction relative to its input and its bottleneck units as ranks
      (:mod:`lightning_peft.pruning.adapter_importance`).

    Then, at the first optimizer-step boundary after estimation:

    * heads are ranked per layer and ``head_ratio`` of each layer's heads pruned (with grouped-query attention whole
      key/value groups, ranked by the mean score of their query heads), neurons by a global quantile
      (``neuron_ratio`` of all MLP neurons) -- physically: ``qkv`` / ``q,k,v``, ``proj`` / ``o``, ``fc1`` / ``up`` /
      ``gate``, ``fc2`` / ``down`` become smaller Linears, head counts follow. The score (``score=``) is either the
      first-order Taylor importance ``|m * dL/dm|`` of each mask, averaged over the second half of the estimation
      (``"taylor"``, the default), or the paper's mask magnitude ``|m|`` (``"magnitude"``). After a short
      estimation the masks have barely left 1 and ``|m|`` ranks nearly at random; with ``"magnitude"`` a warning
      says so when the masks' coefficient of variation is below 0.05 (measured: ``docs/early_pruning_safety.md``);
    * ``peft_module_ratio`` of the LoRA layers (lowest module score) are removed (replaced by their base Linear) and
      in the others ``peft_rank_ratio`` of the ranks (lowest Taylor score) are sliced out of ``A`` and ``B``; the
      adapters are pruned alike (removed whole; bottleneck units sliced out of ``down`` / ``up``);
    * **the loss check** (``max_loss_increase``, on by default): before anything is cut, the loss is measured on a
      few batches (``check_batches``: the batch of the step at the boundary, which nothing has trained on yet, and
      the last ``check_batches - 1`` batches of the estimation) with the model as it is and under the chosen cut
      (:func:`lightning_peft.pruning.decision.simulated_cut`; eval mode, no gradients; the loss is the module's
      ``compute_loss(batch)`` if it has one, else ``training_step`` with logging muted). If the loss grows by more
      than ``max_loss_increase`` (relative), the kind (heads, neurons or PEFT) whose cut alone costs most has its
      ratio halved, and the check repeats; after three halvings a kind is spared entirely. The summary says what
      was cut, what was spared and why; ``early_pruning/loss_before``, ``early_pruning/loss_after_cut``,
      ``early_pruning/loss_increase`` and the ratios used (``early_pruning/<kind>_ratio``) go to the loggers.
      ``max_loss_increase=None`` cuts at the fixed ratios. Under DDP rank 0 runs the check on its batches and its
      plan is broadcast. A run resumed during estimation refills the batch buffer from the batches it sees;
    * the masks leave the model; the optimizer keeps its param groups (LR schedulers continue) with the smaller
      parameters in place of the old ones and their state sliced (Adam's moments of the kept rows/columns);
      under DDP the model is wrapped again; the trainable-set controller (LISA, Half Fine-Tuning, IST) learns the
      new parameters;
    * a per-layer summary (heads, neurons, LoRA ranks kept) is printed and the mask values are saved as
      ``early_pruning_masks.png`` in the logger's directory (drawn with a private generator: the plot never
      changes the run).

    All ratios are the fraction *pruned* (0 switches that part off): the paper's values are the defaults -- each layer
    keeps 2/3 of its heads, 2/3 of the neurons remain, and a quarter of the LoRA layers keep half of their ranks
    (12.5 % of equal-size LoRA parameters) -- and they are upper bounds: the loss check lowers them where the model
    cannot afford them (measured cases: ``docs/early_pruning_safety.md``). Counts are rounded and never reach zero
    (a layer keeps at least one head group, an MLP one neuron, a kept LoRA layer one rank).

    The checkpoint records the plan (``checkpoint["pruning_plan"]``). Resuming with this callback applies it to the
    fresh model before the weights load; the ready modules do it in ``load_from_checkpoint`` and for ``ckpt_path``,
    and any module with ``lightning_peft.pruning.restore_pruned_architecture(self, checkpoint)`` in its
    ``on_load_checkpoint``.

    Beside Lightning's own features: a model compiled in ``configure_model`` (``self.model =
    torch.compile(self.model)``) is pruned through the compiled wrapper (paths are the plain model's, without
    ``_orig_mod.``) and recompiles for the new shapes; the averaged copy of ``StochasticWeightAveraging`` /
    ``EMAWeightAveraging`` is restarted from the pruned weights at the cut (an info line says so); manual
    optimization works (the optimizer is carried over alike), with the loss check only if the module has a
    ``compute_loss(batch)``; Lightning's ``ModelPruning`` is refused (``tests/test_lightning_features.py``).

    Supported: timm ViT / DeiT (and the timm-based AST), HF ViT / AST, BERT-style encoders and Llama-style decoders
    (see :mod:`lightning_peft.pruning.surgery`), with or without HF peft LoRA; single device and ``strategy="ddp"``.
    Not FSDP (``FSDPStrategy`` or FSDP2 through ``ModelParallelStrategy``) or DeepSpeed (sharded parameters
    cannot be sliced in place), nor the spawning DDP variants
    (``ddp_spawn``: the main process would load the pruned weights into its unpruned copy of the model).

    Args:
        estimation_steps: optimizer steps of mask training and importance estimation before pruning (must be
            shorter than the run).
        head_ratio: fraction of attention heads pruned in each layer.
        neuron_ratio: fraction of all MLP neurons pruned (global quantile of the mask values).
        l1: strength of the L1 penalty on the masks.
        peft_module_ratio: fraction of LoRA layers removed.
        peft_rank_ratio: fraction of ranks removed from each remaining LoRA layer.
        seed: breaks ties between equal scores. ``None`` uses the ``seed_everything`` seed when one was set; rank 0's
            seed is used by every rank, and rank 0's plan is broadcast, so all ranks prune alike.
        layers: dotted path of the block container, or a list of paths (one per stack), when the automatic search
            picks the wrong ones.
        plot: save the mask plot at pruning time (needs a logger with a directory).
        score: how heads and neurons are ranked: ``"taylor"`` (mean ``|m * dL/dm|`` over the second half of the
            estimation) or ``"magnitude"`` (``|m|``, the paper's).
        max_loss_increase: the largest relative increase of the loss the cut may cause on the check batches (0.03:
            3 %); the ratios are lowered until it holds. ``None`` prunes at the fixed ratios without a check. On the
            tweet task the accuracy after 150 steps tracked the loss increase at the cut (+2.6 %: -0.6 points
            against plain LoRA; +4.9 %: -4.6; +6.2 %: -6.6), hence 3 %.
        check_batches: batches the loss check measures (the boundary batch and the most recent estimation batches).

    Raises:
        ValueError: if a ratio is outside [0, 1), ``estimation_steps`` is below 1, ``l1`` negative, ``score`` unknown,
            ``max_loss_increase`` not a positive number or ``None``, ``check_batches`` below 1 (at construction); if
            the strategy is FSDP / DeepSpeed / a spawning DDP, ``ModelPruning`` is among the callbacks or the model
            has no prunable site (at setup); if ``estimation_steps`` is not shorter than the run, the masks are in no
            optimizer, or the loss check is on under manual optimization without ``compute_loss`` (at train start).
        TypeError: at pruning, if the loss check cannot get a loss tensor from ``training_step``.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_peft.callbacks import EarlyPruning
        >>> trainer = pl.Trainer(callbacks=[EarlyPruning(estimation_steps=50)], max_steps=150, logger=False)
        >>> fixed = EarlyPruning(estimation_steps=50, score="magnitude", max_loss_increase=None)  # the paper's recipe

    In a LightningCLI YAML file::

        trainer:
          callbacks:
            - class_path: EarlyPruning
              init_args: {estimation_steps: 50}
    """

    def __init__(
        self,
        estimation_steps: int = 200,
        head_ratio: float = 1 / 3,
        neuron_ratio: float = 1 / 3,
        l1: float = 1e-4,
        peft_module_ratio: float = 0.75,
        peft_rank_ratio: float = 0.5,
        seed: int | None = None,
        layers: str | list[str] | None = None,
        plot: bool = True,
        score: str = "taylor",
        max_loss_increase: float | None = 0.03,
        check_batches: int = 4,
    ) -> None:
        check_int(
            "estimation_steps",
            estimation_steps,
            1,
            "the paper estimates over a few hundred steps; 10-20 % of the run.",
            what="optimizer steps before pruning",
        )
        self.head_ratio = _check_ratio("head_ratio", head_ratio, "the paper prunes 1/3 of the heads.")
        self.neuron_ratio = _check_ratio("neuron_ratio", neuron_ratio, "the paper prunes 1/3 of the neurons.")
        self.peft_module_ratio = _check_ratio(
            "peft_module_ratio", peft_module_ratio, "0.75 removes three quarters of the LoRA layers."
        )
        self.peft_rank_ratio = _check_ratio("peft_rank_ratio", peft_rank_ratio, "0.5 halves every LoRA rank.")
        l1 = check_number(
            "l1", l1, 0, math.inf, "the paper uses 1e-4.", "a number >= 0 (L1 penalty on the masks)", include_low=True
        )
        check_choice(
            "score",
            score,
            list(_SCORES),
            "'taylor' ranks by |m * dL/dm|, which means something after a short estimation; 'magnitude' is the"
            " paper's |m|.",
        )
        if max_loss_increase is not None:
            max_loss_increase = check_number(
                "max_loss_increase",
                max_loss_increase,
                0,
                math.inf,
                "0.03 allows 3 %; None prunes at the fixed ratios.",
                "a number > 0 (the relative loss increase the cut may cause) or None (no check)",
            )
        check_int(
            "check_batches",
            check_batches,
            1,
            "4 is enough to see a damaging cut; more costs a forward pass each per try.",
            what="batches the loss check measures",
        )
        check_seed("seed", seed)
        check_bool("plot", plot)
        if layers is not None and not (
            isinstance(layers, str) or (isinstance(layers, (list, tuple)) and all(isinstance(x, str) for x in layers))
        ):
            raise ValueError(
                f"`layers` must be None, a dotted module path or a list of them, got {layers!r}."
                ' HINT: e.g. layers="model.layers"; None finds the blocks automatically.'
            )
        self.score = score
        self.max_loss_increase = max_loss_increase
        self.check_batches = check_batches
        self.check: dict[str, Any] = {}  # what the loss check measured and decided
        self._recent: deque = deque(maxlen=max(check_batches - 1, 0))
        self.estimation_steps = estimation_steps
        self.l1 = float(l1)
        self.seed = seed
        self.layers = layers
        self.plot = plot
        self.plan: PruningPlan | None = None
        self.pruned_at: int | None = None
        self.summary: dict[str, Any] = {}
        self.estimation: Estimation | None = None
        self._estimation_state: dict[str, Any] = {}  # loaded before `setup` built the estimation
        self._seed_value: int | None = None
        self._module: pl.LightningModule | None = None

    @property
    def masks(self) -> PruningMasks | None:
        """The head / neuron masks while they are estimated (``None`` before ``setup`` and after the cut)."""
        return None if self.estimation is None else self.estimation.masks

    @property
    def pruned(self) -> bool:
        """Whether the model has been pruned (in this run or in the checkpoint it resumed from)."""
        return self.plan is not None

    # ------------------------------------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
            raise ValueError(
                f"`EarlyPruning` slices parameters in place, which `{type(trainer.strategy).__name__}` does not allow"
                ' (it shards them). HINT: use `strategy="ddp"`; the pruned model is smaller anyway.'
            )
        if is_spawning_launcher(trainer.strategy):
            raise ValueError(
                "`EarlyPruning` cannot run under a spawning strategy (`ddp_spawn`, `ddp_fork`, `ddp_notebook`): the"
                " main process would receive the pruned weights into its unpruned model. HINT: use"
                ' `strategy="ddp"` (Lightning relaunches the script once per device).'
            )
        pruning = [c for c in trainer.callbacks if isinstance(c, ModelPruning)]
        if pruning:
            raise ValueError(
                "`EarlyPruning` cannot run with Lightning's `ModelPruning`: `torch.nn.utils.prune` replaces a layer's"
                " `weight` by `weight_orig` and a `weight_mask` recomputed in a forward pre-hook, which the physical"
                " cut of EarlyPruning cannot slice, and the pruned layers EarlyPruning makes would drop"
                " ModelPruning's masks. HINT: use one of the two in a run; to prune weights after EarlyPruning's"
                " cut, run `ModelPruning` in a second `fit` on the pruned model."
            )
        self._module = pl_module
        self._seed_value = agree_seed(trainer, self.seed)
        if self.pruned:
            if not plan_applied(pl_module, self.plan):
                apply_pruning_plan(pl_module, self.plan)
            return
        # paths are those of the plain model, also where a part of it is already compiled (`_orig_mod.`)
        with compile_wrappers_lifted(pl_module) as root:
            self._start_estimation(root)
        # A checkpoint written after pruning holds smaller weights: the plan must shape the model before they load.
        # Lightning calls the LightningModule's `on_load_checkpoint` right before loading the weights (callbacks are
        # restored only afterwards), so wrap it for the duration of the fit.
        callback = self

        def shape_from_plan(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
            plan = checkpoint.get("pruning_plan")
            if plan is not None and not callback.pruned:
                callback._drop_estimation(module)
                callback.plan = PruningPlan.from_dict(plan)
                apply_pruning_plan(module, callback.plan)

        run_before_weights_load(pl_module, shape_from_plan)

    def _start_estimation(self, pl_module: pl.LightningModule) -> None:
        sites = find_sites(pl_module, self.layers)
        if sites.skipped and (self.head_ratio or self.neuron_ratio):
            listed = "; ".join(f"{path}: {why}" for path, why in sites.skipped[:6])
            more = f" (and {len(sites.skipped) - 6} more)" if len(sites.skipped) > 6 else ""
            rank_zero_warn(
                f"EarlyPruning leaves {len(sites.skipped)} attention / MLP site(s) unpruned: {listed}{more}."
                " HINT: declare the block's layout with `lightning_peft.layout.register_layout` if the registry"
                " misreads it; what is left out still trains as usual."
            )
        if not self.head_ratio:
            sites = Sites(attention=[], mlp=sites.mlp)
        if not self.neuron_ratio:
            sites = Sites(attention=sites.attention, mlp=[])
        peft = self.peft_module_ratio > 0 or self.peft_rank_ratio > 0
        estimation = Estimation(pl_module, sites, peft, self.layers, self._estimation_state)
        if estimation.empty:
            raise ValueError(
                f"`EarlyPruning` found nothing to prune in {type(pl_module).__name__}: no attention or MLP site in"
                " its blocks that the layout registry can prune, and no LoRA layer or adapter (or all ratios are 0)."
                " HINT: attach LoRA (peft) or adapters, declare your block's layout with"
                " `lightning_peft.layout.register_layout`, or pass `layers=` with the block container path(s)."
            )
        self.estimation = estimation

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruned:
            return
        if (
            self.max_loss_increase is not None
            and not pl_module.automatic_optimization
            and not callable(getattr(pl_module, "compute_loss", None))
        ):
            raise ValueError(
                f"`EarlyPruning`'s loss check (`max_loss_increase={self.max_loss_increase}`) needs the loss of a batch;"
                f" {type(pl_module).__name__} uses manual optimization (`automatic_optimization = False`), so its"
                " `training_step` (which steps the optimizer) cannot be called for that. HINT: add a"
                " `compute_loss(batch)` method returning the loss tensor, or pass `max_loss_increase=None` to cut at"
                " the fixed ratios (the optimizer is carried over to the pruned model either way)."
            )
        total = trainer.estimated_stepping_batches
        if self.estimation_steps >= total:
            raise ValueError(
                f"`estimation_steps` must be shorter than the run ({int(total)} optimizer steps), got"
                f" {self.estimation_steps}. HINT: estimate over 10-30 % of the steps, e.g."
                f" `estimation_steps={max(1, int(total) // 5)}`, or train longer."
            )
        if self.masks is not None:
            in_optimizer = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
            if not all(id(m) in in_optimizer for m in self.masks.parameters()):
                raise ValueError(
                    "`EarlyPruning`'s masks are in no optimizer, so they cannot learn which heads and neurons matter."
                    " HINT: build the optimizer in `configure_optimizers` over every parameter with"
                    " `requires_grad=True` (e.g. `[p for p in self.parameters() if p.requires_grad]`); the masks are"
                    f" registered as `{MASKS}` on the LightningModule before it is called."
                )

    # ------------------------------------------------------------------------------------------ estimation
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.pruned:
            return
        step = trainer.global_step
        if step >= self.estimation_steps:
            self.prune(trainer, pl_module, batch)
            return
        if self.max_loss_increase is not None and step >= self.estimation_steps - (self._recent.maxlen or 0):
            self._recent.append(batch)  # the most recent estimation batches, for the loss check
        if self.estimation is not None:
            with compile_wrappers_lifted(pl_module) as root:
                self.estimation.begin_step(root, score_peft=step >= self.estimation_steps // 2)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        excluded = {} if self.estimation is None else self.estimation.end_step()
        if excluded:
            reasons = "; ".join(sorted(set(excluded.values())))
            rank_zero_warn(
                f"EarlyPruning leaves {len(excluded)} attention / MLP site(s) whole: {reasons}"
                f" (sites: {list(excluded)[:4]}...). HINT: declare the block's layout with"
                " `lightning_peft.layout.register_layout` if it was misread; LoRA and the other sites are pruned."
            )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.pruned or self.estimation is None:
            return
        self.estimation.before_optimizer_step(trainer.global_step >= self.estimation_steps // 2, self.l1)
        if self.masks is not None and logger_writes_this_step(trainer):
            pl_module.log("early_pruning/mask_l1", self.masks.l1(), on_step=True, on_epoch=False)

    # --------------------------------------------------------------------------------------------- pruning
    def ratios(self) -> dict[str, float]:
        """The ratios asked for at construction, by argument name (the loss check may use lower ones)."""
        return {name: getattr(self, name) for names in decision.KINDS.values() for name in names}

    def unit_scores(self) -> tuple[list[Tensor], list[Tensor]]:
        """The head and neuron scores the plan ranks by (``score=``), per attention / MLP site."""
        assert self.estimation is not None
        return self.estimation.unit_scores(self.score)

    def make_plan(self, ratios: Mapping[str, float] | None = None) -> PruningPlan:
        """The plan the current masks and scores give (what :meth:`prune` would apply now without the loss check).

        Args:
            ratios: ``{argument name: ratio}`` overriding some of ``head_ratio``, ``neuron_ratio``,
                ``peft_module_ratio``, ``peft_rank_ratio``.
        """
        e = self.estimation
        return decision.make_plan(
            {**self.ratios(), **(ratios or {})},
            self.masks,
            self.unit_scores() if self.masks is not None else None,
            None if e is None else e.lora,
            None if e is None else e.adapters,
            {} if e is None else e.excluded,
            self._seed_value or 0,
            self.layers,
        )

    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any = None) -> PruningPlan:
        """Decide the plan (rank 0's, broadcast), shrink the model, and carry optimizer, DDP and controller over.

        Args:
            trainer: the running Trainer.
            pl_module: the LightningModule being pruned.
            batch: the batch of the current step (not trained on yet), measured by the loss check with the
                recent estimation batches.
        """
        # the cut works on the plain model (the paths of the plan); compiled parts recompile for the new shapes
        with compile_wrappers_lifted(pl_module):
            plan = self._prune(trainer, pl_module, batch)
        restarted = restart_weight_averaging(trainer, pl_module)
        if restarted:
            rank_zero_info(
                f"EarlyPruning restarted the averaged model of {', '.join(restarted)} from the pruned weights: the"
                " average of the unpruned model does not fit the smaller layers."
            )
        return plan

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> PruningPlan:
        self._warn_if_masks_did_not_separate()
        decision = None
        if trainer.is_global_zero:
            batches = [*self._recent, *([] if batch is None else [batch])]
            decision = self.decide(trainer, pl_module, batches)
        decision = trainer.strategy.broadcast(decision, src=0)
        plan, self.check = PruningPlan.from_dict(decision["plan"]), decision["check"]
        self._recent.clear()
        values = report.mask_values(self.masks)
        peft_before = report.peft_sizes(pl_module)
        params_before = sum(p.numel() for p in pl_module.parameters())
        dropped = self._drop_estimation(pl_module)
        carry_over(trainer, pl_module, apply_pruning_plan(pl_module, plan), drop=dropped)
        self.plan = plan
        self.pruned_at = trainer.global_step
        params_after = sum(p.numel() for p in pl_module.parameters())
        self.summary = report.summarize(plan, values, peft_before, params_before, params_after)
        rank_zero_info(report.format_summary(self.summary, self.check, self.pruned_at, self.score))
        self._log_check(trainer)
        log_dir = trainer.log_dir if trainer.logger is not None else None
        if self.plot and log_dir is not None and trainer.is_global_zero and values["heads"] + values["neurons"]:
            self.plot_masks(os.path.join(log_dir, "early_pruning_masks.png"), values, plan)
        return plan

    # ------------------------------------------------------------------------------------------- loss check
    def decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]) -> dict[str, Any]:
        """Choose the plan: the ratios asked for, lowered per kind until the cut costs at most ``max_loss_increase``.

        Args:
            trainer: the running Trainer (for the precision context).
            pl_module: the LightningModule, still unpruned, masks installed.
            batches: the batches the loss is measured on.

        Returns:
            ``{"plan": plan as a dict, "check": report}``; the report holds ``loss_before``, ``loss_after_cut``,
            ``increase`` (relative), ``requested`` and ``used`` ratios, every try and what was spared and why.
        """
        present = {
            "heads": self.masks is not None and bool(self.masks.attention_sites),
            "neurons": self.masks is not None and bool(self.masks.mlp_sites),
            "peft": self.estimation is not None and bool(self.estimation.importances()),
        }
        return decision.decide(
            trainer,
            pl_module,
            batches,
            requested=self.ratios(),
            tolerance=self.max_loss_increase,
            plan_at=self.make_plan,
            masks=self.masks,
            present=present,
            loss=self._loss,
        )

    @staticmethod
    def _loss(pl_module: pl.LightningModule, batches: list[Any]) -> float:
        return decision.mean_loss(pl_module, batches)

    def _warn_if_masks_did_not_separate(self) -> None:
        if self.masks is None or not (self.head_ratio or self.neuron_ratio):
            return
        spread = self.masks.spread()
        if self.score == "magnitude" and spread < _MIN_SPREAD:
            rank_zero_warn(
                f"EarlyPruning ranks heads and neurons by mask magnitude, but after {self.estimation_steps} estimation"
                f" steps the masks have barely separated (coefficient of variation {spread:.3g} < {_MIN_SPREAD}): the"
                " ranking is close to random. HINT: use `score='taylor'`, estimate longer, or raise `l1`."
            )
        elif self.score == "taylor" and not self.masks.taylor_count:
            rank_zero_warn(
                "EarlyPruning has no Taylor score yet (no optimizer step in the second half of the estimation was"
                " seen); it ranks by mask magnitude. HINT: use `estimation_steps >= 2`."
            )

    def _log_check(self, trainer: pl.Trainer) -> None:
        check = self.check
        if not check.get("enabled") or not trainer.loggers or not trainer.is_global_zero:
            return
        metrics = {
            "early_pruning/loss_before": check["loss_before"],
            "early_pruning/loss_after_cut": check["loss_after_cut"],
            "early_pruning/loss_increase": check["increase"],
        }
        metrics |= {f"early_pruning/{name}": value for name, value in check["used"].items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _drop_estimation(self, pl_module: pl.LightningModule) -> list[torch.Tensor]:
        """Remove masks and importance hooks from the model; return the mask parameters."""
        dropped = [] if self.estimation is None else self.estimation.remove(pl_module)
        self.estimation, self._estimation_state = None, {}
        return dropped

    def plot_masks(self, path: str, mask_values: dict[str, list], plan: PruningPlan) -> str:
        """Save the mask values per layer (heads left, neurons right; pruned ones in red) as a PNG at ``path``."""
        args = (mask_values, plan, self.check, self.pruned_at, self.score)
        return report.save_mask_plot(path, *args, seed=self._seed_value or 0)

    # ---------------------------------------------------------------------------------------------- state
    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.plan is not None:
            checkpoint["pruning_plan"] = self.plan.to_dict()

    @override
    def state_dict(self) -> dict[str, Any]:
        estimation = self.estimation.state_dict() if self.estimation is not None else {}
        return {
            "plan": None if self.plan is None else self.plan.to_dict(),
            "pruned_at": self.pruned_at,
            "summary": self.summary,
            "check": self.check,
            **{key: estimation.get(key, self._estimation_state.get(key)) for key in _ESTIMATION_KEYS},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        plan = state_dict.get("plan")
        self.plan = None if plan is None else PruningPlan.from_dict(plan)
        self.pruned_at = state_dict.get("pruned_at")
        self.summary = state_dict.get("summary", {})
        self.check = state_dict.get("check", {})
        self._estimation_state = {key: state_dict.get(key) for key in _ESTIMATION_KEYS}
        if self.estimation is not None and not self.pruned:
            self.estimation.load_state_dict(self._estimation_state)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            undo_before_weights_load(pl_module)
