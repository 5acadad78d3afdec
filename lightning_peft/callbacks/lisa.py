"""LISA: layerwise importance sampling for memory-efficient fine-tuning."""

from __future__ import annotations

import os
from collections.abc import Set
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_peft._plotting import new_figure, save_figure
from lightning_peft._validation import check_bool, check_choice, check_int, check_seed
from lightning_peft.frozen_prefix import FrozenPrefix
from lightning_peft.layout import LayerStack, Stack, find_blocks
from lightning_peft.layout.embeddings import find_embeddings
from lightning_peft.layout.head import find_head
from lightning_peft.trainable import TrainableSetCallback, agree_seed, likely_culprit

__all__ = ["LISA", "LISAPlan", "OUTSIDE_CHOICES"]

# What the embeddings and the head do: train in every period, train in a period with a block's chance, never train.
OUTSIDE_CHOICES = ("always", "sampled", "frozen")


@dataclass(frozen=True)
class LISAPlan:
    """What a sampling of :class:`LISA` trains, for the tools that inspect it (estimate, support, the registry).

    Attributes:
        sampled: indices of the sampled blocks, in depth order.
        n_blocks: the number of blocks of the model.
        trainable: every parameter that trains: those outside the blocks and those of the sampled blocks, less the
            embeddings and head where they do not train in this period.
        embeddings: the names of the input-embedding parameters (empty when not looked up: ``embeddings="always"``
            and ``head="always"`` train them with everything else outside the blocks).
        head: the names of the head's parameters (as ``embeddings``).
        embeddings_trained: whether the embeddings train in this period.
        head_trained: whether the head trains in this period.
        no_grad_blocks: the blocks below the lowest sampled one that run without autograd
            (:class:`~lightning_peft.frozen_prefix.FrozenPrefix`), by index; empty when the embeddings train.
    """

    sampled: tuple[int, ...]
    n_blocks: int
    trainable: frozenset[str]
    embeddings: tuple[str, ...] = ()
    head: tuple[str, ...] = ()
    embeddings_trained: bool = True
    head_trained: bool = True
    no_grad_blocks: tuple[int, ...] = ()


def _outside_seed(seed: int) -> int:
    """The seed of the embeddings' and head's draws, derived from the blocks' seed."""
    return (seed * 0x9E3779B97F4A7C15 + 1) % 2**63


class LISA(TrainableSetCallback):
    """Layerwise Importance Sampled AdamW (LISA): train the embeddings, head and a few sampled blocks.

    Paper: Pan et al. 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model
    Fine-Tuning", https://arxiv.org/abs/2403.17919.

    Everything outside the blocks (embeddings, final norm, head, downsamplers between stages) always trains, unless
    the user's module froze it. Every ``interval`` optimizer steps, ``n_layers`` blocks are sampled uniformly (or by
    ``layer_weights``) without replacement and the other blocks are frozen. A model with several stacks (encoder and
    decoder, the stages of a CNN, two towers) is sampled as one pool of all its blocks, so every block has the same
    chance whatever its stack; ``per_stack=True`` samples ``n_layers`` blocks in each stack instead. One LR schedule
    runs across periods. The optimizer state of frozen blocks is released (the paper treats it as discarded at each
    period), which is where the memory saving over full fine-tuning comes from; a block sampled again starts with
    fresh state. The blocks are found by :func:`lightning_peft.layout.find_blocks`; freezing goes through the shared
    :class:`~lightning_peft.trainable.TrainableSetController`, so LISA composes with the other methods (a parameter
    trains only if every method allows it) and with gradient accumulation (sets change only between optimizer
    steps). Under DDP all ranks sample the same blocks with no extra configuration.

    With ``torch.compile``, each new trainable set recompiles the compiled graph (``requires_grad`` is part of its
    guards); raise ``torch._dynamo.config.cache_size_limit`` above the number of distinct sets you expect, or
    compile the blocks one by one.

    **Embeddings and head.** The paper trains them in every period (``embeddings="always"``, ``head="always"``, the
    default). At LLM scale they are a large share of the model (a 128k vocabulary makes them 1.05 B of Llama-3-8B's
    parameters: their gradients and AdamW state cost more than LoRA's whole overhead), so each can instead be
    ``"sampled"`` -- it trains in a period with the chance of a block, ``n_layers / n_blocks`` (with ``per_stack``,
    the share of blocks sampled), drawn from a random stream of its own so the blocks drawn stay those of the default
    settings -- or ``"frozen"`` (never trains). The embeddings are the parameters
    :func:`~lightning_peft.layout.embeddings.find_embeddings` names (the token table and, where they sit beside it,
    the position / token-type tables and the embedding norm); the head is what
    :func:`~lightning_peft.layout.find_head` names. A head tied to the token table is one parameter: both must then
    have the same setting. ``"frozen"`` lowers peak memory by the embeddings' (head's) gradients and optimizer
    state; ``"sampled"`` does not lower the peak (a period that draws them needs what ``"always"`` needs) but lowers
    the average and trains them a share of the time. Measured on tweet sentiment (all-MiniLM-L6-v2, 2 of 6 blocks,
    150 steps, one seed; ``benchmarks/results/fidelity_language.md``): the paper's default 0.712 accuracy at 389 MiB
    counted memory, ``embeddings="frozen"`` 0.712 at 251 MiB (LoRA r=8: 0.702 at 245 MiB), ``"sampled"`` 0.713 at
    389 MiB, frozen embeddings with a sampled head 0.713 at 251 MiB. On a causal LM (a byte-level Llama, 1 of 4
    blocks, 3 seeds; ``benchmarks/results/lisa_choices_causal.md``) the head matters more: perplexity +0.3 % with
    frozen embeddings, +1.4 % with a frozen head, +1.9 % with both (then behind LoRA), +0.8 % with a sampled head,
    +0.1 % with sampled embeddings. What each choice costs and saves: ``docs/lisa.md``.

    **Frozen prefix.** In a period where the embeddings do not train, nothing below the lowest sampled block needs a
    gradient. With ``no_grad_prefix`` (default) the blocks below it run under ``torch.no_grad()``
    (:class:`~lightning_peft.frozen_prefix.FrozenPrefix`, hooks installed and removed when the sampled set changes,
    at optimizer-step boundaries only), which saves their activations and backward where something marks their input
    as requiring grad (transformers' activation checkpointing does); the loss and the gradients are the same.

    Logs ``trainable_params`` whenever the set changes; with ``verbose``, prints the sampled block indices; at the
    end of training saves ``lisa_blocks.png`` (which block trained at which step) in the logger's directory.

    Args:
        n_layers: number of blocks trained in each period (the paper's γ: 2; 4 for 70B models).
        interval: optimizer steps between two samplings (the paper's K; LMFlow's default is 20).
        layers: dotted path of the block container, or a list of paths (one per stack), when the automatic search
            picks the wrong ones (``"model.layers"``, ``["encoder.block", "decoder.block"]``).
        release_optimizer_state: release the optimizer state of blocks that stop training. ``False`` keeps it, as
            public implementations do (more memory, state carried across periods); kept for comparison.
        layer_weights: sampling weights of the blocks, one per block in depth order (``None``: uniform, as in the
            paper). Blocks are drawn without replacement with probability proportional to their weight, e.g. to
            favour the top blocks or to follow a per-layer importance measure; a block of weight 0 never trains.
        seed: seed of the sampler. ``None`` uses the ``seed_everything`` seed when one was set, else a random one;
            rank 0's seed is used by every rank.
        verbose: print the sampled block indices at each sampling.
        plot: save the block-by-step plot at the end of training (needs a logger with a directory).
        per_stack: sample ``n_layers`` blocks in every stack (``n_layers`` x number of stacks in all) instead of
            ``n_layers`` from the pool of all blocks.
        embeddings: ``"always"`` (train in every period, as in the paper), ``"sampled"`` (train in a period with a
            block's chance) or ``"frozen"`` (never train).
        head: the same choice for the output head.
        no_grad_prefix: run the frozen blocks below the lowest sampled block without autograd in the periods where
            the embeddings do not train (a model with one stack of blocks).

    Raises:
        ValueError: if ``n_layers`` or ``interval`` is below 1 or ``layer_weights`` has a negative value or fewer
            than ``n_layers`` positive ones, or ``embeddings`` / ``head`` is not one of ``"always"``, ``"sampled"``,
            ``"frozen"`` (at construction), or if ``n_layers`` exceeds the number of blocks of the
            model (or than the smallest stack, with ``per_stack``), ``layer_weights`` does not have one weight per
            block, the model applies shared blocks several times, as ALBERT, the embeddings or head to sample or
            freeze cannot be found, or a tied head and embeddings have different settings (at setup).

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_peft.callbacks import LISA
        >>> trainer = pl.Trainer(callbacks=[LISA(n_layers=2, interval=20)], max_steps=100, logger=False)

    In a LightningCLI YAML file::

        trainer:
          callbacks:
            - class_path: LISA
              init_args: {n_layers: 2, interval: 20}
    """

    def __init__(
        self,
        n_layers: int = 2,
        interval: int = 20,
        layers: str | list[str] | None = None,
        release_optimizer_state: bool = True,
        layer_weights: list[float] | None = None,
        seed: int | None = None,
        verbose: bool = False,
        plot: bool = True,
        per_stack: bool = False,
        embeddings: str = "always",
        head: str = "always",
        no_grad_prefix: bool = True,
    ) -> None:
        super().__init__(release_optimizer_state=release_optimizer_state)
        check_int("n_layers", n_layers, 1, "the paper uses 2 (4 for 70B models).", "blocks trained per period")
        check_int("interval", interval, 1, "the paper's K; 20 is a good default.", "optimizer steps between samplings")
        check_seed("seed", seed)
        for name, value in (
            ("release_optimizer_state", release_optimizer_state),
            ("verbose", verbose),
            ("plot", plot),
            ("per_stack", per_stack),
            ("no_grad_prefix", no_grad_prefix),
        ):
            check_bool(name, value)
        if layer_weights is not None:
            weights = [float(w) for w in layer_weights]
            if any(w < 0 for w in weights) or sum(w > 0 for w in weights) < n_layers:
                raise ValueError(
                    f"`layer_weights` must be non-negative with at least `n_layers`={n_layers} positive values, got"
                    f" {layer_weights!r}. HINT: give every block that may train a positive weight, or leave it None"
                    " for uniform sampling."
                )
        if per_stack and layer_weights is not None:
            raise ValueError(
                "`per_stack=True` and `layer_weights` cannot be combined. HINT: give `layer_weights` for the pool of"
                " all blocks, or sample per stack uniformly."
            )
        for name, value in (("embeddings", embeddings), ("head", head)):
            check_choice(
                name,
                value,
                OUTSIDE_CHOICES,
                "'always' trains them in every period as the paper does; 'frozen' saves the most memory.",
            )
        self.embeddings = embeddings
        self.head = head
        self.no_grad_prefix = no_grad_prefix
        self.per_stack = per_stack
        self.layer_weights = layer_weights
        self.n_layers = n_layers
        self.interval = interval
        self.layers = layers
        self.seed = seed
        self.verbose = verbose
        self.plot = plot
        self.history: list[tuple[int, list[int]]] = []
        self.stack: LayerStack | None = None
        self.sampled: list[int] | None = None
        self._sampled_at: int | None = None
        self._generator: torch.Generator | None = None
        # a second stream for the embeddings' and head's draws: the blocks drawn stay those of the default settings
        self._outside_generator: torch.Generator | None = None
        self._allowed: frozenset[str] | None = None
        self._pool: tuple[int, ...] | None = None  # blocks that may train, when not all (see `_pool_changed`)
        self._pool_generation: int | None = None
        self._embedding_names: tuple[str, ...] = ()
        self._head_names: tuple[str, ...] = ()
        self._tied = False
        # whether the embeddings and the head train in the current period (drawn with the blocks when "sampled")
        self.embeddings_trained = embeddings != "frozen"
        self.head_trained = head != "frozen"
        self.prefix: FrozenPrefix | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.stack = self._checked_stack(pl_module)
        self._embedding_names, self._head_names, self._tied = self._checked_outside(pl_module, self.stack)
        if self._generator is None or self._outside_generator is None:  # not (wholly) restored from a checkpoint
            seed = agree_seed(trainer, self.seed)
            if self._generator is None:
                self._generator = torch.Generator().manual_seed(seed)
            self._outside_generator = torch.Generator().manual_seed(_outside_seed(seed))
        self._allowed = None
        self._pool, self._pool_generation = None, None
        super().setup(trainer, pl_module, stage)

    def _pool_changed(self, trainer: pl.Trainer) -> bool:
        """Whether the blocks that may train changed since the last call.

        A block whose parameters the user or another callback froze (BackboneFinetuning before its unfreezing epoch)
        is left out of sampling until one of them becomes trainable.
        """
        controller = self.controller
        if controller is None or controller.generation == self._pool_generation:
            return False
        assert self.stack is not None
        self._pool_generation = controller.generation
        pool = tuple(i for i in range(len(self.stack)) if controller.may_train(self.stack.block_parameter_names(i)))
        pool = None if len(pool) == len(self.stack) else pool
        if pool == self._pool:
            return False
        self._pool = pool
        if pool is not None:
            left_out = [self.stack.names[i] for i in range(len(self.stack)) if i not in pool]
            rank_zero_warn(
                f"LISA: {len(left_out)} of {len(self.stack)} blocks have no parameter that may train (frozen by"
                f" {likely_culprit(trainer)}): {left_out[:4]}{' ...' if len(left_out) > 4 else ''}."
                + (f" LISA samples among the {len(pool)} others" if pool else " LISA trains no block")
                + " until they become trainable. HINT: to sample every block, leave the blocks trainable when"
                " `fit` starts (a BaseFinetuning callback that freezes a backbone holding them delays them)."
            )
        return True

    def _checked_stack(self, module: nn.Module) -> LayerStack:
        """The blocks of ``module``, checked against ``n_layers``, ``layer_weights`` and shared blocks."""
        stack = find_blocks(module, self.layers)
        stack.refuse_shared(
            "LISA",
            "sampling among shared blocks trains all of them or none; use HalfFineTuning (it halves the shared"
            " block while embeddings and head train), LoRA, or full fine-tuning.",
        )
        n_blocks = len(stack)
        if self.per_stack:
            smallest = min(stack.stacks, key=len)
            if self.n_layers > len(smallest):
                raise ValueError(
                    f"`n_layers` must be between 1 and {len(smallest)} with `per_stack=True` (stack"
                    f" {smallest.path!r} has {len(smallest)} blocks), got {self.n_layers}. HINT: lower `n_layers`,"
                    " or sample from the pool of all blocks (`per_stack=False`)."
                )
        elif self.n_layers > n_blocks:
            raise ValueError(
                f"`n_layers` must be between 1 and {n_blocks} (the model has {n_blocks} blocks at"
                f" {stack.path!r}), got {self.n_layers}. HINT: lower `n_layers`, or pass `layers=` if other"
                " containers hold the blocks."
            )
        if self.layer_weights is not None and len(self.layer_weights) != n_blocks:
            raise ValueError(
                f"`layer_weights` must have one weight per block ({n_blocks} at {stack.path!r}), got"
                f" {len(self.layer_weights)}. HINT: list {n_blocks} weights in depth order."
            )
        if self.n_layers == n_blocks and not self.per_stack:
            rank_zero_warn(
                f"LISA samples all {n_blocks} blocks (`n_layers={self.n_layers}`): this is full fine-tuning."
            )
        return stack

    def _checked_outside(self, module: nn.Module, stack: LayerStack) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
        """The embeddings' and head's parameter names and whether they share one (tied), checked with the settings."""
        if self.embeddings == "always" and self.head == "always":
            return (), (), False
        outside = stack.outside_parameter_names()
        head_modules = find_head(module)
        embeddings = find_embeddings(module, outside, head_modules)
        name_of = {id(p): n for n, p in module.named_parameters()}
        head_ids = {id(p) for m in head_modules if m for p in module.get_submodule(m).parameters()}
        head = [n for i, n in name_of.items() if i in head_ids]
        tied = any(n in embeddings for n in head)
        for name, setting, found, where in (
            ("embeddings", self.embeddings, embeddings, "input embeddings"),
            ("head", self.head, head, "output head"),
        ):
            if setting != "always" and not found:
                raise ValueError(
                    f"`{name}={setting!r}` needs the model's {where}, but none was found among the parameters outside"
                    f" the blocks ({outside[:6]}). HINT: leave `{name}='always'`, or name the module as transformers"
                    " or timm models do (`embed_tokens`, `lm_head`, ...)."
                )
        if tied and self.embeddings != self.head:
            raise ValueError(
                f"`embeddings={self.embeddings!r}` and `head={self.head!r}` differ, but the head is tied to the token"
                f" table (one parameter: {[n for n in head if n in embeddings]}). HINT: give both the same value, or"
                " untie the head (`tie_word_embeddings=False`)."
            )
        return tuple(embeddings), tuple(head), tied

    def preview(self, module: nn.Module) -> LISAPlan:
        """The first sampling a ``fit`` of ``module`` would make with these arguments, without a Trainer.

        ``seed`` seeds it (0 when ``seed`` is None); this callback's own state is left untouched, so it can still be
        used for training. The memory estimate and the methods registry use it.

        Raises:
            ValueError: as :meth:`setup` does, for a model the arguments do not fit.

        Example::

            >>> from torch import nn
            >>> net = nn.Sequential(nn.Linear(4, 4), nn.ModuleList(nn.Linear(4, 4) for _ in range(4)))
            >>> LISA(n_layers=1, seed=0, layers="1").preview(net).sampled
            (0,)
        """
        probe = LISA(
            n_layers=self.n_layers,
            interval=self.interval,
            layers=self.layers,
            layer_weights=self.layer_weights,
            seed=self.seed,
            plot=False,
            per_stack=self.per_stack,
            embeddings=self.embeddings,
            head=self.head,
            no_grad_prefix=self.no_grad_prefix,
        )
        probe.stack = probe._checked_stack(module)
        probe._embedding_names, probe._head_names, probe._tied = probe._checked_outside(module, probe.stack)
        probe._generator = torch.Generator().manual_seed(0 if self.seed is None else self.seed)
        probe._outside_generator = torch.Generator().manual_seed(_outside_seed(0 if self.seed is None else self.seed))
        probe._sample(0)
        assert probe.sampled is not None
        frozen = probe._frozen_names()
        trainable = frozenset(n for n, _ in module.named_parameters() if n not in frozen)
        return LISAPlan(
            tuple(probe.sampled),
            len(probe.stack),
            trainable,
            embeddings=probe._embedding_names,
            head=probe._head_names,
            embeddings_trained=probe.embeddings_trained,
            head_trained=probe.head_trained,
            no_grad_blocks=tuple(probe._no_grad_blocks()),
        )

    def _frozen_names(self) -> set[str]:
        """The parameters this period leaves frozen: the blocks not sampled, and embeddings / head not drawn."""
        assert self.stack is not None and self.sampled is not None
        frozen = {
            n for i in range(len(self.stack)) if i not in self.sampled for n in self.stack.block_parameter_names(i)
        }
        if not self.embeddings_trained:
            frozen.update(self._embedding_names)
        if not self.head_trained:
            frozen.update(self._head_names)
        return frozen

    def _no_grad_blocks(self) -> list[int]:
        """The blocks run without autograd in this period: those below the lowest sampled one, where nothing trains.

        Nothing does there when the embeddings do not train this period and the model has one stack of blocks.
        """
        assert self.stack is not None and self.sampled is not None
        if not self.no_grad_prefix or self.embeddings_trained or len(self.stack.stacks) > 1 or not self.sampled:
            return []
        return list(range(min(self.sampled)))

    @override
    def trainable_parameters(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> Set[str] | None:
        due = step % self.interval == 0 and step != self._sampled_at
        if self._pool_changed(trainer) or self.sampled is None or due:
            self._sample(step)
        if self._allowed is None:
            # every parameter of the module now but those this period freezes: parameters that other methods
            # registered after this one's setup (early pruning's masks) are outside the blocks and train
            frozen = self._frozen_names()
            self._allowed = self.names_except((n for n, _ in pl_module.named_parameters()), frozen)
            self._install_prefix()
        return self._allowed

    def _install_prefix(self) -> None:
        """Hook the blocks below the lowest sampled one (replacing the last period's hooks); called at a boundary."""
        self._remove_prefix()
        blocks = self._no_grad_blocks()
        if blocks:
            assert self.stack is not None
            self.prefix = FrozenPrefix([self.stack[i] for i in blocks])

    def _remove_prefix(self) -> None:
        if self.prefix is not None:
            self.prefix.remove()
            self.prefix = None

    def _sample(self, step: int) -> None:
        assert self.stack is not None and self._generator is not None
        if self._pool is not None:  # some blocks cannot train: draw among the others, by weight
            weights = torch.tensor(self.layer_weights or [1.0] * len(self.stack), dtype=torch.float64)
            weights[[i for i in range(len(self.stack)) if i not in self._pool]] = 0.0
            sampled = []
            for stack in self.stack.stacks if self.per_stack else [Stack("", 0, len(self.stack))]:
                part = weights[stack.start : stack.stop]
                count = min(self.n_layers, int((part > 0).sum()))
                if count:
                    drawn = torch.multinomial(part, count, replacement=False, generator=self._generator)
                    sampled += [stack.start + i for i in drawn.tolist()]
            self.sampled = sorted(sampled)
        elif self.per_stack:
            sampled = []
            for stack in self.stack.stacks:
                order = torch.randperm(len(stack), generator=self._generator)
                sampled += [stack.start + i for i in order[: self.n_layers].tolist()]
            self.sampled = sorted(sampled)
        elif self.layer_weights is None:
            order = torch.randperm(len(self.stack), generator=self._generator)
            self.sampled = sorted(order[: self.n_layers].tolist())
        else:
            weights = torch.tensor(self.layer_weights, dtype=torch.float64)
            order = torch.multinomial(weights, self.n_layers, replacement=False, generator=self._generator)
            self.sampled = sorted(order.tolist())
        # the embeddings and head from their own stream, so the blocks drawn are those of the default settings
        chance = len(self.sampled) / len(self.stack)
        if self.embeddings == "sampled" or self.head == "sampled":
            assert self._outside_generator is not None
            draws = torch.rand(2, generator=self._outside_generator, dtype=torch.float64) < chance
            if self.embeddings == "sampled":
                self.embeddings_trained = bool(draws[0])
            if self.head == "sampled":
                self.head_trained = self.embeddings_trained if self._tied else bool(draws[1])
        self._sampled_at = step
        self._allowed = None
        self.history.append((step, self.sampled))
        if self.verbose:
            parts = [n for n, on in (("embeddings", self.embeddings_trained), ("head", self.head_trained)) if on]
            rank_zero_info(
                f"LISA step {step}: training blocks {self.sampled} of {len(self.stack)}"
                + (f" and the {' and '.join(parts)}" if parts and (self._embedding_names or self._head_names) else "")
            )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_prefix()
        self._allowed = None  # a later fit installs the hooks again with the set
        log_dir = trainer.log_dir if trainer.logger is not None else None
        if self.plot and self.history and log_dir is not None and trainer.is_global_zero:
            self.plot_history(os.path.join(log_dir, "lisa_blocks.png"), end_step=trainer.global_step)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_prefix()
        self._allowed = None

    def plot_history(self, path: str, end_step: int | None = None) -> str:
        """Save a picture of which block trained during which steps to ``path`` (PNG) and return the path."""
        assert self.stack is not None or self.history
        n_blocks = len(self.stack) if self.stack is not None else 1 + max(max(b) for _, b in self.history)
        last = max(end_step or 0, self.history[-1][0] + 1)
        fig, ax = new_figure((8, 0.3 * n_blocks + 1.5))
        bounds = [step for step, _ in self.history[1:]] + [last]
        for (start, blocks), stop in zip(self.history, bounds, strict=True):
            for block in blocks:
                ax.broken_barh([(start, stop - start)], (block - 0.4, 0.8), color="tab:blue")
        ax.set(xlabel="optimizer step", ylabel="block", xlim=(0, last), ylim=(-0.5, n_blocks - 0.5))
        ax.set_yticks(range(n_blocks))
        if self.stack is not None and len(self.stack.stacks) > 1:  # where each stack begins, named on the right
            for stack in self.stack.stacks:
                if stack.start:
                    ax.axhline(stack.start - 0.5, color="grey", linewidth=0.8)
                ax.text(last, (stack.start + stack.stop - 1) / 2, f" {stack.path}", va="center", fontsize=8)
        per = " per stack" if self.per_stack else ""
        ax.set_title(f"LISA: {self.n_layers}{per} of {n_blocks} blocks, resampled every {self.interval} steps")
        return save_figure(fig, path)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "sampled": self.sampled,
            "sampled_at": self._sampled_at,
            "generator": None if self._generator is None else self._generator.get_state(),
            "outside_generator": None if self._outside_generator is None else self._outside_generator.get_state(),
            "history": self.history,
            "embeddings_trained": self.embeddings_trained,
            "head_trained": self.head_trained,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sampled = state_dict.get("sampled")
        self._sampled_at = state_dict.get("sampled_at")
        self.history = [(int(step), list(blocks)) for step, blocks in state_dict.get("history", [])]
        # a setting other than "sampled" decides by itself; a sampled one continues the checkpoint's draw
        self.embeddings_trained = self.embeddings != "frozen"
        if self.embeddings == "sampled":
            self.embeddings_trained = bool(state_dict.get("embeddings_trained", True))
        self.head_trained = self.head != "frozen"
        if self.head == "sampled":
            self.head_trained = bool(state_dict.get("head_trained", True))
        generator_state = state_dict.get("generator")
        if generator_state is not None:
            self._generator = torch.Generator()
            self._generator.set_state(generator_state)
        outside_state = state_dict.get("outside_generator")
        if outside_state is not None:
            self._outside_generator = torch.Generator()
            self._outside_generator.set_state(outside_state)
        self._allowed = None
