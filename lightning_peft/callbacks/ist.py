"""IST: importance-aware sparse tuning of the PEFT modules of a few layers per step."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Set
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_deprecation, rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_peft._batch import batch_loss
from lightning_peft._compat import logger_writes_this_step
from lightning_peft._plotting import new_figure, save_figure
from lightning_peft._validation import check_bool, check_int, check_number, check_seed
from lightning_peft.adapters.bottleneck import Adapter
from lightning_peft.layout import LayerStack, find_blocks
from lightning_peft.trainable import TrainableSetCallback, agree_seed

__all__ = ["IST"]


class IST(TrainableSetCallback):
    """Importance-aware Sparse Tuning (IST): train the PEFT modules of a few layers, chosen by learned importance.

    Paper: Yao et al. 2024, "Layer-wise Importance Matters: Less Memory for Better Performance in Parameter-efficient
    Fine-tuning of Large Language Models", https://arxiv.org/abs/2410.11772.

    For models adapted with PEFT modules: HF peft layers (LoRA and the other peft tuners that have ``scale_layer``)
    and this package's adapters (:mod:`lightning_peft.adapters`). Each layer (block, found by
    :func:`~lightning_peft.layout.find_blocks`) has a score ``s_l``, starting at 0.

    - At every optimizer step, ``int(update_ratio * L)`` layers are drawn without replacement with probabilities
      proportional to ``sigmoid(-s)``, and only their PEFT parameters train. Only PEFT parameters inside the blocks
      are restricted: what else trains (head, ``modules_to_save``) keeps training, and what the module froze (the
      base model) stays frozen.
    - Every ``interval`` steps (at steps ``interval``, ``2 * interval``, ...), before the step's set is drawn,
      ``n_candidates`` distinct sets of ``int(candidate_ratio * L)`` layers are drawn by ``sigmoid(s)``. For each set
      the PEFT output of its layers is multiplied by ``suppression`` and the loss ``loss_k`` of the step's training
      batch is computed in eval mode without gradients. With ``R_k = exp(-loss_k)``, ``r_k = R_k - mean(R)`` and
      ``p = sigmoid(s)`` taken before the update, ``s_i += reward_lr * r_k * p_i * (1 - p_i)`` for every layer ``i``
      of set ``k`` (summed over the sets). A set whose suppression barely hurts (low loss, positive reward) gains
      score, so it is trained less often: ``s`` measures how little a layer's PEFT module matters.

    This follows the official implementation (``ist.py`` of the authors' repository): same sampling, same reward,
    ``p`` from the scores before the update, distinct candidate sets, resampling every step. Differences, none of
    which changes the algorithm: the candidate losses use the current step's training batch (the official code
    draws a separate shuffled batch of the training set; both are training batches the step has not trained on yet);
    each module's train/eval state is restored exactly afterwards (the official code calls ``train()`` on the whole
    model); distinct candidate sets are required only while ``n_candidates`` does not exceed the number of possible
    sets (the official loop would never end); under DDP the candidate losses are averaged over ranks so every rank
    keeps the same scores. Suppression goes through peft's ``scale_layer`` and each adapter's ``scale`` attribute;
    the original scales are written back from a saved copy, which is exact where peft's ``unscale_layer`` division
    is not (a factor of 0 or one that is not a power of two).

    Optimizer state: as in the official code (which only flips ``requires_grad`` under the Trainer's AdamW), the PEFT
    parameters of a layer that stops training keep their optimizer state and continue with it when the layer is
    drawn again. Releasing it (``release_optimizer_state=True``, what LISA does with whole blocks) would restart
    Adam's moments at nearly every draw, since the set changes at every step, to save the state of PEFT parameters,
    which is small: on the 6-layer MiniLM (150 steps, 3 seeds) it cost IST + LoRA 1.4 points at ``update_ratio=0.25``
    and 1.6 at 0.75 (``benchmarks/results/ist_update_ratio*.md``).

    The loss of a batch: if the LightningModule has a ``compute_loss(batch)`` method (the ready modules of this
    package do), it is used; otherwise ``training_step(batch, batch_idx)`` is called with logging muted, and it must
    return the loss tensor or a dict with a ``"loss"`` key (automatic optimization).

    The scores are logged as ``ist/score_<i>`` on the steps the loggers write; at the end of training
    ``ist_scores.png`` (scores over steps) is saved in the logger's directory. Scores, sampler state and step are in
    the checkpoint, so a resumed run continues exactly.

    Args:
        update_ratio: fraction of the layers whose PEFT modules train at each step (the paper: 0.25).
        interval: optimizer steps between two importance updates (10).
        n_candidates: candidate sets per importance update (3).
        candidate_ratio: fraction of the layers in each candidate set (0.5).
        suppression: factor on the PEFT output of a candidate set's layers (0.25).
        reward_lr: step size of the score update (10).
        seed: seed of the sampler. ``None`` uses the ``seed_everything`` seed when one was set, else a random one;
            rank 0's seed is used by every rank.
        layers: dotted path of the block container, or a list of paths (one per stack), when the automatic search
            picks the wrong ones.
        verbose: print the scores at each importance update.
        plot: save ``ist_scores.png`` at the end of training (needs a logger with a directory).
        release_optimizer_state: free the optimizer state of PEFT parameters whose layer stops training (they
            restart from fresh state when drawn again). ``False`` (default) keeps it, as the official code does.

    Raises:
        ValueError: if an argument is out of range (at construction), or at setup if the model's blocks hold no PEFT
            module, a peft layer cannot be suppressed (no ``scale_layer``), or a ratio selects no layer.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_peft.callbacks import IST
        >>> trainer = pl.Trainer(callbacks=[IST(update_ratio=0.25, interval=10)], max_steps=100, logger=False)

    In a LightningCLI YAML file::

        trainer:
          callbacks:
            - class_path: IST
              init_args: {update_ratio: 0.25, interval: 10}
    """

    def __init__(
        self,
        update_ratio: float = 0.25,
        interval: int = 10,
        n_candidates: int = 3,
        candidate_ratio: float = 0.5,
        suppression: float = 0.25,
        reward_lr: float = 10.0,
        seed: int | None = None,
        layers: str | list[str] | None = None,
        verbose: bool = False,
        plot: bool = True,
        release_optimizer_state: bool = False,
    ) -> None:
        super().__init__(release_optimizer_state=release_optimizer_state)
        for name, value in (("update_ratio", update_ratio), ("candidate_ratio", candidate_ratio)):
            check_number(
                name,
                value,
                0,
                1,
                "the paper uses update_ratio=0.25 and candidate_ratio=0.5.",
                "a fraction of the layers in (0, 1]",
                include_high=True,
            )
        check_int("interval", interval, 1, "the paper uses 10.", "optimizer steps between importance updates")
        check_int(
            "n_candidates", n_candidates, 2, "the paper uses 3.", "rewards are relative to the mean over candidates"
        )
        check_number(
            "suppression",
            suppression,
            0,
            1,
            "the paper uses 0.25; 0 switches the modules off.",
            "in [0, 1) (factor on the PEFT output of a candidate set)",
            include_low=True,
        )
        check_number("reward_lr", reward_lr, 0, float("inf"), "the paper uses 10.", "a positive number")
        check_seed("seed", seed)
        for name, value in (("verbose", verbose), ("plot", plot), ("release_optimizer_state", release_optimizer_state)):
            check_bool(name, value)
        self.update_ratio = float(update_ratio)
        self.interval = interval
        self.n_candidates = n_candidates
        self.candidate_ratio = float(candidate_ratio)
        self.suppression = float(suppression)
        self.reward_lr = float(reward_lr)
        self.seed = seed
        self.layers = layers
        self.verbose = verbose
        self.plot = plot
        self.stack: LayerStack | None = None
        self.scores: Tensor | None = None
        self.sampled: list[int] | None = None
        self.history: list[tuple[int, list[float]]] = []
        self._generator: torch.Generator | None = None
        self._sampled_at: int | None = None
        self._updated_at: int | None = None
        self._adapters: list[list[Adapter]] = []
        self._peft_layers: list[list[nn.Module]] = []
        self._peft_params: list[frozenset[str]] = []
        self._all_params: frozenset[str] = frozenset()
        self._allowed: frozenset[str] | None = None

    # ----------------------------------------------------------------------------------------------- set-up

    @property
    def n_blocks(self) -> int:
        """Number of blocks ``L`` that IST scores and samples from (all blocks of its stacks)."""
        assert self.stack is not None
        return len(self.stack)

    @property
    def n_layers(self) -> int:
        """Deprecated name of :attr:`n_blocks` (in LISA, ``n_layers`` is the number of blocks sampled)."""
        rank_zero_deprecation("`IST.n_layers` is renamed `IST.n_blocks` (the number of all blocks); use `n_blocks`.")
        return self.n_blocks

    @property
    def n_trained(self) -> int:
        """Blocks whose PEFT modules train at each step: ``int(update_ratio * L)``."""
        return int(self.update_ratio * self.n_blocks)

    @property
    def n_suppressed(self) -> int:
        """Blocks in each candidate set: ``int(candidate_ratio * L)``."""
        return int(self.candidate_ratio * self.n_blocks)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.stack = find_blocks(pl_module, self.layers)
        self.stack.refuse_shared(
            "IST",
            "IST scores and samples distinct blocks; with shared blocks use plain LoRA / adapters (every step trains"
            " them all), or HalfFineTuning.",
        )
        self._find_peft_modules(pl_module)
        n_blocks = self.n_blocks
        for name, count, ratio in (
            ("update_ratio", self.n_trained, self.update_ratio),
            ("candidate_ratio", self.n_suppressed, self.candidate_ratio),
        ):
            if count < 1:
                raise ValueError(
                    f"`{name}`={ratio} selects int({ratio} * {n_blocks}) = 0 of the {n_blocks} blocks at"
                    f" {self.stack.path!r}. HINT: raise `{name}` to at least {1 / n_blocks:.3g}."
                )
        if not pl_module.automatic_optimization and not callable(getattr(pl_module, "compute_loss", None)):
            raise ValueError(
                f"IST needs the loss of a batch; {type(pl_module).__name__} uses manual optimization, so its"
                " `training_step` cannot be called for that. HINT: add a `compute_loss(batch)` method returning the"
                " loss tensor."
            )
        if self._generator is None:  # not restored from a checkpoint
            self._generator = torch.Generator().manual_seed(agree_seed(trainer, self.seed))
        if self.scores is None:
            self.scores = torch.zeros(n_blocks, dtype=torch.float64)
            self.history = [(0, self.scores.tolist())]
        self._allowed = None
        super().setup(trainer, pl_module, stage)

    def _find_peft_modules(self, pl_module: pl.LightningModule) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        assert self.stack is not None
        self._adapters, self._peft_layers, self._peft_params = [], [], []
        names_of = {id(p): n for n, p in pl_module.named_parameters()}
        unsupported = []
        for block_name, block in zip(self.stack.names, self.stack.blocks, strict=True):
            adapters, peft_layers, params = [], [], set()
            for local, module in block.named_modules():
                if isinstance(module, Adapter):
                    adapters.append(module)
                    params.update(names_of[id(p)] for p in module.parameters() if id(p) in names_of)
                elif isinstance(module, BaseTunerLayer):
                    own = [
                        names_of[id(p)]
                        for attr in module.adapter_layer_names
                        if isinstance(getattr(module, attr, None), nn.Module)
                        for p in getattr(module, attr).parameters()
                        if id(p) in names_of
                    ]
                    if not own:
                        continue
                    if not callable(getattr(module, "scale_layer", None)):
                        unsupported.append(f"{block_name}.{local} ({type(module).__name__})")
                        continue
                    peft_layers.append(module)
                    params.update(own)
            self._adapters.append(adapters)
            self._peft_layers.append(peft_layers)
            self._peft_params.append(frozenset(params))
        if unsupported:
            raise ValueError(
                f"IST suppresses PEFT modules through peft's `scale_layer`, which these layers lack: {unsupported[:5]}."
                " HINT: use LoRA (or another peft tuner with `scale_layer`) or lightning_peft.adapters."
            )
        if not any(self._peft_params):
            raise ValueError(
                f"IST trains the PEFT modules of sampled blocks, but the blocks at {self.stack.path!r} hold none."
                " HINT: adapt the model first, e.g. `peft={'peft_type': 'LORA', ...}` on the ready modules, or"
                " `lightning_peft.adapters.add_adapters(model)`."
            )
        empty = [i for i, params in enumerate(self._peft_params) if not params]
        if empty:
            rank_zero_warn(f"IST: blocks {empty} hold no PEFT module; sampling them trains nothing.")
        self._all_params = frozenset(names_of.values())

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # parameters that other methods registered after this one's setup (early pruning's masks) train as well
        self._all_params = frozenset(n for n, _ in pl_module.named_parameters())
        self._allowed = None
        assert self.scores is not None
        if len(self.scores) != self.n_blocks:
            raise ValueError(
                f"The checkpoint's IST scores are for {len(self.scores)} blocks, the model has {self.n_blocks}."
                " HINT: resume with the model the checkpoint was trained with."
            )

    # ------------------------------------------------------------------------------------------ sampling

    def _probabilities(self, sign: float) -> Tensor:
        assert self.scores is not None
        return torch.sigmoid(sign * self.scores)

    def _draw(self, probabilities: Tensor, count: int) -> list[int]:
        return sorted(torch.multinomial(probabilities, count, replacement=False, generator=self._generator).tolist())

    def _sample(self, step: int) -> None:
        self.sampled = self._draw(self._probabilities(-1.0), self.n_trained)
        self._sampled_at = step
        frozen: set[str] = set()
        for index, params in enumerate(self._peft_params):
            if index not in self.sampled:
                frozen.update(params)
        self._allowed = self.names_except(self._all_params, frozen)

    @override
    def trainable_parameters(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> Set[str] | None:
        if self._sampled_at != step or self._allowed is None:
            self._sample(step)
        return self._allowed

    @override
    def on_step_boundary(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, step: int
    ) -> None:
        # called by the controller before any method's trainable set is asked for (the update needs the batch)
        if step == self._sampled_at and self._allowed is not None:  # inside an accumulation window, or done
            return
        if step > 0 and step % self.interval == 0 and step != self._updated_at:
            self.update_importance(trainer, pl_module, batch, batch_idx)
        self._sample(step)
        if logger_writes_this_step(trainer):
            self._log_scores(pl_module)

    def _log_scores(self, pl_module: pl.LightningModule) -> None:
        assert self.scores is not None
        for index, score in enumerate(self.scores.tolist()):
            pl_module.log(f"ist/score_{index}", score, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------------------ importance update

    def candidate_sets(self) -> list[list[int]]:
        """Draw ``n_candidates`` sets of ``int(candidate_ratio * L)`` blocks by ``sigmoid(s)``."""
        probabilities = self._probabilities(1.0)
        possible = math.comb(self.n_blocks, self.n_suppressed)
        sets: list[list[int]] = []
        for _ in range(self.n_candidates):
            draw = self._draw(probabilities, self.n_suppressed)
            for _attempt in range(1000):
                if draw not in sets or len(sets) >= possible:
                    break
                draw = self._draw(probabilities, self.n_suppressed)
            sets.append(draw)
        return sets

    @contextmanager
    def suppressed(self, blocks: list[int]) -> Iterator[None]:
        """Multiply the PEFT output of ``blocks`` by ``suppression`` inside the context; restore it exactly after."""
        adapters = [a for i in blocks for a in self._adapters[i]]
        peft_layers = [m for i in blocks for m in self._peft_layers[i]]
        adapter_scales = [a.scale for a in adapters]
        peft_scales = [dict(m.scaling) if isinstance(getattr(m, "scaling", None), dict) else None for m in peft_layers]
        try:
            for adapter in adapters:
                adapter.scale = adapter.scale * self.suppression
            for module in peft_layers:
                module.scale_layer(self.suppression)
            yield
        finally:
            for adapter, scale in zip(adapters, adapter_scales, strict=True):
                adapter.scale = scale
            for module, saved in zip(peft_layers, peft_scales, strict=True):
                if saved is None:
                    module.unscale_layer(self.suppression)
                else:
                    module.scaling.update(saved)

    def update_importance(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Score candidate sets on ``batch`` (eval mode, no gradients) and update the scores."""
        sets = self.candidate_sets()
        modes = {module: module.training for module in pl_module.modules()}
        losses = []
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                for blocks in sets:
                    with self.suppressed(blocks):
                        losses.append(batch_loss(pl_module, batch, batch_idx, "IST").detach().float().reshape(()))
        finally:
            for module, training in modes.items():
                module.training = training
        mean_losses = trainer.strategy.reduce(torch.stack(losses), reduce_op="mean")  # identity on one device
        self.update_scores(sets, mean_losses.cpu().tolist())
        self._updated_at = trainer.global_step
        self.history.append((trainer.global_step, self.scores.tolist()))
        if self.verbose:
            shown = ", ".join(f"{s:.3f}" for s in self.scores.tolist())
            rank_zero_info(f"IST step {trainer.global_step}: candidate losses {mean_losses.tolist()}, scores [{shown}]")

    def update_scores(self, sets: list[list[int]], losses: list[float]) -> None:
        """Apply the reward update for candidate ``sets`` whose suppressed losses were ``losses``."""
        assert self.scores is not None
        if len(sets) != len(losses):
            raise ValueError(f"one loss per candidate set is needed, got {len(sets)} sets and {len(losses)} losses.")
        rewards = torch.tensor([math.exp(-loss) for loss in losses], dtype=torch.float64)
        rewards = rewards - rewards.mean()
        p = torch.sigmoid(self.scores)  # before any update of this round, as in the official code
        gain = p * (1 - p)
        for blocks, reward in zip(sets, rewards.tolist(), strict=True):
            for index in blocks:
                self.scores[index] += self.reward_lr * reward * gain[index]

    # --------------------------------------------------------------------------------- end and state

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir if trainer.logger is not None else None
        if self.plot and self.history and log_dir is not None and trainer.is_global_zero:
            self.plot_scores(os.path.join(log_dir, "ist_scores.png"), end_step=trainer.global_step)

    def plot_scores(self, path: str, end_step: int | None = None) -> str:
        """Save the scores of every block over the steps to ``path`` (PNG) and return the path."""
        steps = [step for step, _ in self.history]
        values = torch.tensor([scores for _, scores in self.history])
        if end_step is not None and end_step > steps[-1]:  # the scores hold until the end
            steps.append(end_step)
            values = torch.cat([values, values[-1:]])
        fig, ax = new_figure((8, 4.5))
        for index in range(values.shape[1]):
            ax.step(steps, values[:, index].tolist(), where="post", label=f"block {index}")
        ax.set(xlabel="optimizer step", ylabel="score s (higher: trained less often)")
        ax.set_title(f"IST scores, updated every {self.interval} steps")
        ax.legend(fontsize="small", ncol=max(1, values.shape[1] // 12), loc="best")
        return save_figure(fig, path)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "scores": None if self.scores is None else self.scores.tolist(),
            "generator": None if self._generator is None else self._generator.get_state(),
            "step": self._sampled_at,
            "sampled": self.sampled,
            "updated_at": self._updated_at,
            "history": self.history,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        scores = state_dict.get("scores")
        self.scores = None if scores is None else torch.tensor(scores, dtype=torch.float64)
        generator_state = state_dict.get("generator")
        if generator_state is not None:
            self._generator = torch.Generator()
            self._generator.set_state(generator_state)
        self._sampled_at = state_dict.get("step")
        self.sampled = state_dict.get("sampled")
        self._updated_at = state_dict.get("updated_at")
        self.history = [(int(step), list(scores)) for step, scores in state_dict.get("history", [])]
        self._allowed = None
