"""Continual learning on spoken keywords: learn 4 new words, and measure what each method forgets of 6 old ones.

An Audio Spectrogram Transformer (the AST recipe on a small timm ViT, random initialisation) is first trained on 6
keywords (yes, no, up, down, left, right) -- the "pre-training" -- with full fine-tuning. From that same checkpoint,
each method then fine-tunes it on 4 new keywords (on, off, stop, go), with the same data order, steps, optimizer and
seed. The head has 10 outputs from the start, so the new words need no new parameters.

Recorded for every method, on voices never heard in training (the 4 held-out voices of ``SpokenKeywords``):

- new-word accuracy: the new words' clips, classified among the 4 new words, and among all 10;
- old-word accuracy before and after the fine-tuning: the old words' clips classified among the 6 old words (what
  the model still tells apart among them; the whole head trains with every method), and among all 10
  (class-incremental: a model fine-tuned only on new words predicts new words, whatever the method);
- forgetting: old-word accuracy (among the old words) before minus after;
- trainable parameters (elements that received a gradient in a step, max over steps), memory counted as in
  ``benchmarks/memory.py`` (unique bytes of parameters + gradients (max over steps) + optimizer state (max over
  steps) + tensors saved for backward (max over steps)), and the wall time of the fine-tuning.

Methods are entries of ``METHODS`` (a :class:`~benchmarks.recipes.Recipe`: the registry's method, its settings
here and the label): full fine-tuning, LISA and Half Fine-Tuning, each seeded with ``--seed``; every method
registered in :mod:`lightning_peft.methods` beyond the built-in ones runs too, with its defaults.

    python -m benchmarks.continual_audio             # CPU, under a minute on 2 idle cores (+ ~30 s of synthesis once)
    python -m benchmarks.continual_audio --quick     # a few steps of each stage: a smoke test, not a measurement

Results: ``benchmarks/results/continual_audio.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import functools
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lightning_peft.data import SpokenKeywords
from lightning_peft.data.spoken_keywords import DEFAULT_WORDS
from lightning_peft.modules import AudioClassifier

from .harness import MeasuringCallback, environment, storage_bytes, write_results
from .recipes import Recipe, with_registered

ROOT = Path(__file__).resolve().parents[1]
OLD_WORDS = DEFAULT_WORDS[:6]
NEW_WORDS = DEFAULT_WORDS[6:]


METHODS: dict[str, Recipe] = {
    "full": Recipe("full fine-tuning"),
    "lisa": Recipe(
        "LISA (2 of 6 blocks, K=10)", "lisa", lambda seed: {"n_layers": 2, "interval": 10, "seed": seed, "plot": False}
    ),
    "hft": Recipe("Half Fine-Tuning (half of each category per block)", "hft", lambda seed: {"seed": seed}),
}


def recipes() -> dict[str, Recipe]:
    """:data:`METHODS` and a run of every method registered beyond the built-in ones (with its defaults)."""
    return with_registered(METHODS)


MODEL = {
    "model": "vit_tiny_patch16_224",
    "model_kwargs": {"embed_dim": 64, "depth": 6, "num_heads": 4},
    "target_length": 128,
    "fstride": 16,
    "tstride": 16,
}


def _subset(dataset, words: tuple[str, ...]) -> Subset:
    labels = {DEFAULT_WORDS.index(w) for w in words}
    return Subset(dataset, [i for i, y in enumerate(dataset.labels.tolist()) if y in labels])


@torch.no_grad()
def accuracy(module: AudioClassifier, clips: list[tuple[Tensor, Tensor]], among: tuple[str, ...] | None) -> float:
    """Accuracy of ``module`` on ``clips``, the prediction taken among the classes of ``among`` (None: all)."""
    module.eval()
    features = torch.stack([x for x, _ in clips])
    labels = torch.stack([y for _, y in clips])
    logits = torch.cat([module(chunk) for chunk in features.split(64)])
    if among is not None:
        mask = torch.full((logits.shape[1],), float("-inf"))
        mask[[DEFAULT_WORDS.index(w) for w in among]] = 0.0
        logits = logits + mask
    module.train()
    return float((logits.argmax(1) == labels).float().mean())


def _trainer(max_epochs: int, callbacks: list[Callback], limit: int | None) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        limit_train_batches=limit,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )


def evaluate(module: AudioClassifier, old_clips, new_clips) -> dict[str, float]:
    return {
        "old_among_old": accuracy(module, old_clips, OLD_WORDS),
        "old_among_all": accuracy(module, old_clips, None),
        "new_among_new": accuracy(module, new_clips, NEW_WORDS),
        "new_among_all": accuracy(module, new_clips, None),
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    data = SpokenKeywords(words=DEFAULT_WORDS, cache_dir=args.cache_dir, batch_size=32, seed=args.seed)
    data.setup("fit")
    held_out = torch.utils.data.ConcatDataset([data.val_set, data.test_set])
    old_clips = [held_out[i] for i in range(len(held_out)) if DEFAULT_WORDS[int(held_out[i][1])] in OLD_WORDS]
    new_clips = [held_out[i] for i in range(len(held_out)) if DEFAULT_WORDS[int(held_out[i][1])] in NEW_WORDS]
    limit = 3 if args.quick else None
    generator = functools.partial(torch.Generator().manual_seed, args.seed)

    def loader(words):
        return DataLoader(_subset(data.train_set, words), batch_size=32, shuffle=True, generator=generator())

    pl.seed_everything(args.seed)
    optimizer = functools.partial(torch.optim.AdamW, lr=args.pretrain_lr, weight_decay=0.05)
    module = AudioClassifier(len(DEFAULT_WORDS), optimizer=optimizer, **MODEL)
    start = time.perf_counter()
    _trainer(args.pretrain_epochs, [], limit).fit(module, train_dataloaders=loader(OLD_WORDS))
    pretrain_seconds = time.perf_counter() - start
    pretrained = {k: v.clone() for k, v in module.state_dict().items()}
    before = evaluate(module, old_clips, new_clips)
    print(f"pre-trained on {list(OLD_WORDS)} in {pretrain_seconds:.0f} s: {before}", flush=True)

    results = {}
    for key in args.methods:
        method = recipes()[key]
        pl.seed_everything(args.seed)
        optimizer = functools.partial(torch.optim.AdamW, lr=args.finetune_lr, weight_decay=0.05)
        module = AudioClassifier(len(DEFAULT_WORDS), optimizer=optimizer, **MODEL)
        module.load_state_dict(pretrained)
        module = method.prepare(module)
        counter = MeasuringCallback()
        trainer = _trainer(args.finetune_epochs, [*method.callbacks(seed=args.seed), counter], limit)
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader(NEW_WORDS))
        seconds = time.perf_counter() - start
        after = evaluate(module, old_clips, new_clips)
        memory = {
            "params": storage_bytes(p.detach() for p in module.parameters()),
            "grads": counter.results["grad_bytes"],
            "optimizer_state": counter.results["optimizer_state_bytes"],
            "saved_activations": counter.results["saved_activation_bytes"],
        }
        results[key] = {
            "label": method.label,
            **after,
            "forgetting": before["old_among_old"] - after["old_among_old"],
            "steps": trainer.global_step,
            "seconds": round(seconds, 1),
            "trained_elements": counter.results["trainable_params"],
            "total_elements": sum(p.numel() for p in module.parameters()),
            "memory": {
                **memory,
                "total": sum(memory.values()),
            },
        }
        print(f"{key}: {results[key]}", flush=True)
    full = results.get("full")
    if full:
        for entry in results.values():
            entry["memory_vs_full"] = round(entry["memory"]["total"] / full["memory"]["total"], 3)
            entry["time_vs_full"] = round(entry["seconds"] / full["seconds"], 3)
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": {**environment(), "machine": platform.machine(), "threads": args.threads},
        "setup": {
            "old_words": list(OLD_WORDS),
            "new_words": list(NEW_WORDS),
            "model": MODEL,
            "voices": data.split_voices(),
            "train_clips": {
                "old": len(_subset(data.train_set, OLD_WORDS)),
                "new": len(_subset(data.train_set, NEW_WORDS)),
            },
            "held_out_clips": {"old": len(old_clips), "new": len(new_clips)},
            "pretrain": {"epochs": args.pretrain_epochs, "lr": args.pretrain_lr, "seconds": round(pretrain_seconds, 1)},
            "finetune": {"epochs": args.finetune_epochs, "lr": args.finetune_lr},
            "seed": args.seed,
            "quick": args.quick,
        },
        "before": before,
        "methods": results,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def render_markdown(results: dict) -> str:
    setup, before = results["setup"], results["before"]
    lines = [
        "# Continual learning on spoken keywords",
        "",
        f"AST (timm ViT, width {setup['model']['model_kwargs']['embed_dim']}, {setup['model']['model_kwargs']['depth']}"
        f" blocks, random init) pre-trained with full fine-tuning on {', '.join(setup['old_words'])}"
        f" ({setup['pretrain']['epochs']} epochs, {setup['train_clips']['old']} clips), then fine-tuned on"
        f" {', '.join(setup['new_words'])} ({setup['finetune']['epochs']} epochs, {setup['train_clips']['new']} clips,"
        f" AdamW lr {setup['finetune']['lr']}) by each method from the same checkpoint, data order and seed."
        f" Accuracy on {setup['held_out_clips']['old'] + setup['held_out_clips']['new']} clips of 4 voices never"
        f" heard in training. Created {results['created']} ({results['environment']['threads']} torch threads, CPU).",
        "",
        f"Before fine-tuning: old words {_pct(before['old_among_old'])} (among the old words), new words"
        f" {_pct(before['new_among_new'])} among the new words (chance: 25 %).",
        "",
        "| method | new words (among new) | new words (among all 10) | old words after (among old) | forgetting"
        " | old words after (among all 10) | trained params | memory | × full FT | time | × full FT |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in results["methods"].values():
        lines.append(
            f"| {entry['label']} | {_pct(entry['new_among_new'])} | {_pct(entry['new_among_all'])}"
            f" | {_pct(entry['old_among_old'])} | {100 * entry['forgetting']:+.1f} pts | {_pct(entry['old_among_all'])}"
            f" | {entry['trained_elements'] / 1e3:.0f} k of {entry['total_elements'] / 1e3:.0f} k"
            f" | {entry['memory']['total'] / 2**20:.1f} MiB | {entry.get('memory_vs_full', float('nan')):.2f}"
            f" | {entry['seconds']:.0f} s | {entry.get('time_vs_full', float('nan')):.2f} |"
        )
    lines += [
        "",
        "Forgetting: old-word accuracy among the old words before minus after (positive = forgotten). Memory:"
        " parameters + gradients + optimizer state + tensors saved for backward, each the maximum over the"
        " fine-tuning steps (counted as in `benchmarks/memory.py`); time: wall time of the fine-tuning. Among all 10"
        " classes a model fine-tuned only on new words predicts new words for old clips, whatever the method: that"
        " column shows the class-incremental view, which no method here addresses (it needs replay or a frozen head).",
        "",
        "Memory components (MiB):",
        "",
        "| method | params | grads | optimizer state | saved activations |",
        "|---|---:|---:|---:|---:|",
    ]
    for entry in results["methods"].values():
        memory = {k: v / 2**20 for k, v in entry["memory"].items()}
        lines.append(
            f"| {entry['label']} | {memory['params']:.2f} | {memory['grads']:.2f} | {memory['optimizer_state']:.2f}"
            f" | {memory['saved_activations']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(recipes()), choices=list(recipes()))
    parser.add_argument("--pretrain-epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=None, help="SpokenKeywords cache (default: the user's cache dir)")
    parser.add_argument("--quick", action="store_true", help="3 steps per epoch: a smoke test, not a measurement")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    results = run(args)
    write_results(args.out_dir, "continual_audio", results, render_markdown)
    print(render_markdown(results))


if __name__ == "__main__":
    main()
