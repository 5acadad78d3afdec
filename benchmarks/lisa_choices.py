"""What LISA's ``embeddings`` / ``head`` choices cost on a causal LM: perplexity beside the paper's default and LoRA.

The causal-LM benchmark of :mod:`benchmarks.causal_lm`: a byte-level Llama (hidden 256, 4 blocks, vocabulary 257)
pretrained here in full on tweet texts, then fine-tuned for ``--steps`` on another draw; perplexity per byte on the
16 held-out batches. Runs (:data:`RUNS`): LoRA r=8 on every projection (the causal runs' LoRA), LISA with the
paper's default (embeddings and head train in every period), and LISA with ``embeddings`` / ``head`` ``"frozen"``
or ``"sampled"``. LISA trains 1 of the 4 blocks (a quarter of the blocks, nearer the paper's 2 of 32 than 2 of 4,
which is half the model), resampled every 15 steps (10 periods in 150 steps). Each seed seeds
``seed_everything`` (LoRA's initialisation) and LISA's sampler, so within a seed every LISA run draws the same
blocks; the data and its order are the same in every run (``TextFiles`` orders the batches with the data's seed).
AdamW, weight decay 0.01; a learning rate per family (``--lisa-lr``, ``--lora-lr``), each the best of ``--sweep``
(LISA's default and LoRA at a few rates, first seed): 1e-3 for LISA, which updates the full weights of its block,
and 3e-3 for LoRA's zero-initialised low-rank updates. The sweep is scored on the same held-out batches as the
runs (there is no third split); it favours both families alike, and the LISA choices all share LISA's rate.

Recorded per run: the final perplexity, the trainable parameters (elements that received a gradient in a step: max
and mean over steps; LISA's set changes each period) and in how many steps the embeddings and the head trained.

Run from the repository root::

    python -m benchmarks.lisa_choices                  # 3 seeds x 7 runs: ~19 minutes on 1 thread (4 pretraining)
    python -m benchmarks.lisa_choices --cache /tmp/lm  # keep the pretrained model there / reuse it (~15 minutes)
    python -m benchmarks.lisa_choices --sweep --cache /tmp/lm   # the learning-rate sweep, seed 0 (~6 minutes)
    python -m benchmarks.lisa_choices --render         # rewrite the markdown from the JSON results

Results: ``benchmarks/results/lisa_choices_causal.{json,md}`` (``lisa_choices_causal_lr`` for ``--sweep``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from .harness import RESULTS_DIR, environment, quiet_cpu_trainer, write_markdown, write_results
from .recipes import Recipe

LISA_SETTINGS: dict[str, Any] = {"n_layers": 1, "interval": 15, "plot": False}


def _lisa(**choices: str) -> Any:
    """LISA's settings in this benchmark with ``choices`` (``embeddings``, ``head``), seeded with the run's seed."""
    return lambda seed, interval: {**LISA_SETTINGS, "interval": interval, **choices, "seed": seed}


RUNS: dict[str, Recipe] = {
    "lora": Recipe("LoRA r=8, every projection", "lora", peft=True),
    "lisa": Recipe("LISA, paper default (embeddings and head `always`)", "lisa", _lisa()),
    "embeddings_frozen": Recipe('`embeddings="frozen"`', "lisa", _lisa(embeddings="frozen")),
    "head_frozen": Recipe('`head="frozen"`', "lisa", _lisa(head="frozen")),
    "both_frozen": Recipe(
        '`embeddings="frozen"`, `head="frozen"` (the lightest)', "lisa", _lisa(embeddings="frozen", head="frozen")
    ),
    "head_sampled": Recipe('`head="sampled"`', "lisa", _lisa(head="sampled")),
    "embeddings_sampled": Recipe('`embeddings="sampled"`', "lisa", _lisa(embeddings="sampled")),
}
LISA_LR = 1e-3  # each family's best of --sweep (lisa_choices_causal_lr.md)
LORA_LR = 3e-3
SWEEP = {"lisa": (1e-4, 3e-4, 1e-3, 3e-3), "lora": (1e-3, 3e-3, 1e-2)}
# --tiny: a model and data small enough for a test to run every row in seconds
TINY = {
    "config": {
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 64,
        "vocab_size": 257,
        "max_position_embeddings": 128,
    },
    "documents": 400,
    "pretrain_steps": 2,
    "steps": 6,
    "interval": 2,
}


class TrainedParameters(Callback):
    """Per optimizer step: the elements that received a gradient, and whether the embeddings and the head did."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.embeddings_steps = 0
        self.head_steps = 0

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.counts.append(sum(p.numel() for p in pl_module.parameters() if p.grad is not None))
        model = pl_module.model
        self.embeddings_steps += model.get_input_embeddings().weight.grad is not None
        self.head_steps += model.get_output_embeddings().weight.grad is not None


def run_one(name: str, seed: int, lr: float, steps: int, setup: Any, root: str, interval: int) -> dict:
    """Fine-tune the pretrained model with run ``name`` for ``steps`` (LISA resampling every ``interval``); its
    record."""
    from lightning_peft.callbacks import LISA
    from lightning_peft.modules import CausalLM

    from .causal_lm import CAUSAL_LORA, adamw, perplexity

    recipe = RUNS[name]
    pl.seed_everything(seed, verbose=False)
    module = CausalLM(model=setup.folder, peft=CAUSAL_LORA if recipe.peft else None, optimizer=adamw(lr))
    callbacks = recipe.callbacks(seed=seed, interval=interval)
    counter = TrainedParameters()
    trainer = quiet_cpu_trainer(
        root, [counter, *callbacks], max_steps=steps, num_sanity_val_steps=0, limit_val_batches=0
    )
    start = time.perf_counter()
    trainer.fit(module, setup.data)
    row = {
        "seed": seed,
        "lr": lr,
        "final_ppl": perplexity(module, setup.held_out),
        "wall_s": round(time.perf_counter() - start, 1),
        "total_params": sum(p.numel() for p in module.parameters()),
        "trainable_max": max(counter.counts),
        "trainable_mean": statistics.mean(counter.counts),
        "embeddings_steps": counter.embeddings_steps,
        "head_steps": counter.head_steps,
        "steps": len(counter.counts),
    }
    lisa = next((c for c in callbacks if isinstance(c, LISA)), None)
    if lisa is not None:
        row["blocks"] = [[step, blocks] for step, blocks in lisa.history]
    print(name, row, flush=True)
    return row


def _family_lr(name: str, args: argparse.Namespace) -> float:
    return args.lora_lr if RUNS[name].peft else args.lisa_lr


def render(results: dict[str, Any]) -> str:
    """The markdown of a results file: per run, final perplexity per seed, the mean and the difference to LISA's
    default (or, for ``--sweep``, per learning rate)."""
    env, args, pre, runs = results["env"], results["args"], results["pretraining"], results["runs"]
    sweep = args["sweep"]
    config = results["config"]
    lines = [
        "# LISA's embeddings and head on a causal LM"
        + (": learning-rate sweep" if sweep else ": perplexity of each choice beside the paper's default and LoRA"),
        "",
        f"`{results['command']}`",
        "",
        f"{env['date']}, torch {env['torch']}, {env['device']}, {env['torch_threads']} thread(s). A byte-level Llama"
        f" (hidden {config['hidden_size']}, {config['num_hidden_layers']} blocks, {config['num_attention_heads']}"
        f" heads / {config['num_key_value_heads']} key-value heads, intermediate {config['intermediate_size']},"
        f" vocabulary {config['vocab_size']}) pretrained here in full for {pre['steps']} steps on tweet texts"
        f" (`benchmarks/causal_lm.py`), then fine-tuned for {args['steps']} steps of 8 x 128 bytes on another draw;"
        f" perplexity per byte on {results['held_out_batches']} held-out batches. The pretrained model's:"
        f" **{pre['val_ppl']:.3f}**. LISA: {LISA_SETTINGS['n_layers']} of {config['num_hidden_layers']} blocks,"
        f" resampled every {args['interval']} steps; LoRA: r=8 on every projection."
        " AdamW, weight decay 0.01; "
        + (
            "the learning rate of each row."
            if sweep
            else f"lr {args['lisa_lr']} for LISA, {args['lora_lr']} for LoRA, each the best of `--sweep`"
            " (`lisa_choices_causal_lr.md`)."
        )
        + " Each seed seeds LoRA's initialisation and LISA's sampler: within a seed every LISA run draws the same"
        " blocks. Trainable: elements that received a gradient in a step, max over steps (mean over steps);"
        " embeddings / head: the steps in which they trained.",
        "",
    ]
    seeds = sorted({r["seed"] for rows in runs.values() for r in rows})
    if sweep:
        lines += ["| run | lr | final ppl (seed " + ", ".join(map(str, seeds)) + ") |", "|---|---:|---:|"]
        for key, rows in runs.items():
            name, _ = key.split("@")
            for row in rows:
                lines.append(f"| {RUNS[name].label} | {row['lr']:g} | {row['final_ppl']:.3f} |")
        return "\n".join(lines) + "\n"
    base = runs.get("lisa")
    base_mean = statistics.mean(r["final_ppl"] for r in base) if base else None
    header = " | ".join(f"seed {s}" for s in seeds)
    lines += [
        f"| run | trainable (max) | (mean) | embeddings / head trained | final ppl: {header} | mean |"
        " vs paper default |",
        "|---|---:|---:|---|" + "---:|" * len(seeds) + "---:|---:|",
    ]
    for name, rows in runs.items():
        by_seed = {r["seed"]: r for r in rows}
        mean = statistics.mean(r["final_ppl"] for r in rows)
        first = rows[0]
        delta = "" if base_mean is None or name == "lisa" else f"{mean - base_mean:+.3f} ({mean / base_mean - 1:+.1%})"
        cells = " | ".join(f"{by_seed[s]['final_ppl']:.3f}" if s in by_seed else "-" for s in seeds)
        trained = " / ".join(
            f"{statistics.mean(r[k] for r in rows):.3g} of {first['steps']}" for k in ("embeddings_steps", "head_steps")
        )
        lines.append(
            f"| {RUNS[name].label} | {first['trainable_max']:,} ({first['trainable_max'] / first['total_params']:.1%})"
            f" | {statistics.mean(r['trainable_mean'] for r in rows):,.0f} | {trained} | {cells} | {mean:.3f} |"
            f" {delta} |"
        )
    model = (base or rows)[0]["total_params"]
    size = f"Model: {model:,} parameters"
    if base and "both_frozen" in runs:  # the same blocks with and without the two tables
        default = base[0]["trainable_max"]
        tables = default - runs["both_frozen"][0]["trainable_max"]
        size += (
            f"; embeddings and head {tables:,} ({tables / model:.1%} of the model, {tables / default:.1%} of what the"
            " paper default trains)"
        )
    lines += [
        "",
        f"{size}. Fit times (s, seed {seeds[0]}): "
        + ", ".join(f"{name} {rows[0]['wall_s']:.0f}" for name, rows in runs.items())
        + f"; pretraining {pre['wall_s']:.0f} s"
        + (
            " (by an earlier run with the same `--cache`, whose pretrained model this run reused; without `--cache`"
            " the script pretrains it first)"
            if "cached_in" in pre
            else ""
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="steps of pretraining the LM")
    parser.add_argument("--lisa-lr", type=float, default=LISA_LR)
    parser.add_argument("--lora-lr", type=float, default=LORA_LR)
    parser.add_argument("--sweep", action="store_true", help=f"LISA's default and LoRA at the rates {SWEEP}, 1 seed")
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep / reuse the pretrained model in")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--tiny", action="store_true", help="a tiny model and data (seconds; the tests)")
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON results")
    args = parser.parse_args(argv)
    from .causal_lm import CAUSAL_LLAMA, HELD_OUT_BATCHES, prepare

    torch.set_num_threads(args.threads)
    config, documents, interval = CAUSAL_LLAMA, None, LISA_SETTINGS["interval"]
    if args.tiny:
        config, documents, interval = TINY["config"], TINY["documents"], TINY["interval"]
        args.pretrain_steps, args.steps = TINY["pretrain_steps"], TINY["steps"]
    stem = "lisa_choices_causal" + ("_lr" if args.sweep else "") + ("_tiny" if args.tiny else "")
    if args.render:
        results = json.loads((args.out_dir / f"{stem}.json").read_text())
        write_markdown(args.out_dir / f"{stem}.md", render(results))
        return results
    if args.sweep:
        plan = [(f"{n}@{lr:g}", n, args.seeds[0], lr) for n in ("lisa", "lora") for lr in SWEEP[n]]
    else:
        plan = [(n, n, s, _family_lr(n, args)) for s in args.seeds for n in args.runs]
    results: dict[str, Any] = {
        "env": environment(packages=("transformers", "peft")),
        "command": "python -m benchmarks.lisa_choices " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {
            **{k: v for k, v in vars(args).items() if k not in ("out_dir", "cache", "render")},
            "interval": interval,
        },
        "config": config,
        "held_out_batches": HELD_OUT_BATCHES,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as root:
        sizes = {} if documents is None else {"documents": documents}
        setup = prepare(root, args.pretrain_steps, config, cache=args.cache, **sizes)
        results["pretraining"] = setup.pretraining
        print("pretrained", setup.pretraining, flush=True)
        for key, name, seed, lr in plan:  # written after every run
            row = run_one(name, seed, lr, args.steps, setup, root, interval)
            results["runs"].setdefault(key, []).append(row)
            write_results(args.out_dir, stem, results, render)
    print(render(results))
    return results


if __name__ == "__main__":
    main()
