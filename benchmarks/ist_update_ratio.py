"""IST's update ratio on the tweet task: how many layers' LoRA must train per step to keep plain LoRA's accuracy.

``benchmarks/fidelity.py`` found IST + LoRA 9 points below plain LoRA on all-MiniLM-L6-v2 (0.610 vs 0.703 after 150
steps, one seed). The model has 6 layers, so IST's default ``update_ratio=0.25`` trains the LoRA modules of
``int(0.25 * 6) = 1`` layer per step. This script measures how the gap depends on the ratio, over several seeds.

Runs, all with ``fidelity.py``'s language recipe and its LoRA / IST + LoRA settings (``TextClassifier`` +
``TweetSentiment``, batch 16 x 48 tokens, AdamW lr 1e-3 and weight decay 0.01, peft LoRA r=8 / alpha 16 on every
Linear of the encoder blocks, ``IST(interval=10, n_candidates=3, candidate_ratio=0.5, suppression=0.25,
reward_lr=10)``), then one validation pass over the 1,000 held-out tweets:

* plain LoRA and IST + LoRA with each ``--ratios`` value (default 0.25, 0.5, 0.75: 1, 3 and 4 of the 6 layers per
  step), ``--steps`` optimizer steps (150), for each of ``--seeds`` (42, 43, 44);
* a longer run (``--long-steps``, 450; one seed, ``--long-seed``) of plain LoRA, IST at 0.25 and IST at the ratio
  with the best mean accuracy in the short runs (skipped when ``--long-steps 0``).

A seed sets what it sets in ``fidelity.py``: ``seed_everything`` (the LoRA and head initialisation, and IST's
sampler, which takes the ``seed_everything`` seed) and the training shuffle. The train / validation split stays the
one of seed 42 for every seed, so all runs are scored on the same 1,000 tweets, and seed 42 repeats ``fidelity.py``'s
LoRA and IST + LoRA runs. Within a seed the methods run one after the other in one process, so machine load affects
them alike.

Recorded per run: final validation accuracy, wall time of ``fit`` (training + the validation pass), the sum of the
training step times, trainable parameters per step (elements that received a gradient in a step, max over steps,
from ``harness.MeasuringCallback``; the classification head trains in every step) and, for IST, the final layer scores.

Run from the repository root (the defaults: 15 runs, 41 minutes on a shared 2-core CPU with one torch thread)::

    python -m benchmarks.ist_update_ratio
    python -m benchmarks.ist_update_ratio --seeds 42 --steps 50 --ratios 0.5 --long-steps 0   # a quick check
    python -m benchmarks.ist_update_ratio --render   # rewrite the markdown from the JSON

Results: ``benchmarks/results/ist_update_ratio.json`` (every run, written after each one) and ``.md`` (tables and
a summary).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_peft.callbacks import IST

from .fidelity import LANGUAGE_SEED, LANGUAGE_STEPS, LORA_CONFIG, LORA_LR, MODEL, fit_and_record
from .harness import RESULTS_DIR, MeasuringCallback, environment, quiet_cpu_trainer, write_json, write_markdown

NAME = "ist_update_ratio"
RATIOS = (0.25, 0.5, 0.75)
SEEDS = (42, 43, 44)
LONG_STEPS = 450
# IST's settings of fidelity.py's "ist_lora" row (the paper's defaults); only update_ratio varies here.
IST_SETTINGS = {"interval": 10, "n_candidates": 3, "candidate_ratio": 0.5, "suppression": 0.25, "reward_lr": 10.0}


def method_key(ratio: float | None) -> str:
    return "lora" if ratio is None else f"ist_{ratio:g}"


def method_label(ratio: float | None, n_layers: int = 6) -> str:
    if ratio is None:
        return "LoRA r=8"
    return f"IST {ratio:g} + LoRA ({int(ratio * n_layers)} of {n_layers} layers)"


def tweet_data() -> Any:
    """``fidelity.py``'s tweet data: the split of seed 42, batch 16 x 48 tokens (tokenized once for all runs)."""
    from lightning_peft.data import TweetSentiment

    data = TweetSentiment(tokenizer=MODEL, max_length=48, batch_size=16, val_size=1000, seed=LANGUAGE_SEED)
    data.setup("fit")
    return data


def run_one(
    data: Any, ratio: float | None, seed: int, steps: int, root: str, release_state: bool = False
) -> dict[str, Any]:
    """Fine-tune with plain LoRA (``ratio=None``) or IST + LoRA at ``update_ratio=ratio``; return the run's numbers."""
    from lightning_peft.modules import TextClassifier

    gc.collect()
    data.seed = seed  # the training shuffle; the split was made at setup with seed 42 and is kept
    pl.seed_everything(seed, verbose=False)
    module = TextClassifier(
        MODEL,
        num_labels=data.num_labels,
        peft=dict(LORA_CONFIG),
        optimizer=functools.partial(torch.optim.AdamW, lr=LORA_LR, weight_decay=0.01),
    )
    probe = MeasuringCallback()
    callbacks: list[Callback] = [probe]
    ist = None
    if ratio is not None:
        # seed None: seed_everything's
        ist = IST(update_ratio=ratio, seed=None, plot=False, release_optimizer_state=release_state, **IST_SETTINGS)
        callbacks.append(ist)
    trainer = quiet_cpu_trainer(root, callbacks, max_epochs=1, limit_train_batches=steps, num_sanity_val_steps=0)
    record = fit_and_record(trainer, module, data, probe)
    lora_params = sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
    result: dict[str, Any] = {
        "method": method_key(ratio),
        "update_ratio": ratio,
        "seed": seed,
        **record,
        "trainable_params_per_step": probe.results["trainable_params"],
        "lora_params": lora_params,
        "total_params": probe.results["total_params"],
        "layers": 6 if ist is None else ist.n_blocks,
        "layers_trained_per_step": 6 if ist is None else ist.n_trained,
        "ist_final_scores": None if ist is None else [round(s, 4) for s in ist.scores.tolist()],
    }
    del trainer, module, probe, callbacks, ist
    gc.collect()
    return result


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(runs: list[dict[str, Any]], ratios: list[float]) -> dict[str, Any]:
    """Mean and sample std over seeds per method, and the paired (same seed) accuracy difference to plain LoRA."""
    lora_acc = {r["seed"]: r["val_acc"] for r in runs if r["method"] == "lora"}
    summary = {}
    for ratio in [None, *ratios]:
        rows = [r for r in runs if r["method"] == method_key(ratio)]
        if not rows:
            continue
        paired = [r["val_acc"] - lora_acc[r["seed"]] for r in rows if r["seed"] in lora_acc]
        summary[method_key(ratio)] = {
            "update_ratio": ratio,
            "seeds": [r["seed"] for r in rows],
            "val_acc": _mean_std([r["val_acc"] for r in rows]),
            "val_acc_minus_lora": _mean_std(paired) if paired else None,
            "fit_seconds": _mean_std([r["fit_seconds"] for r in rows]),
            "trainable_params_per_step": rows[0]["trainable_params_per_step"],
            "layers_trained_per_step": rows[0]["layers_trained_per_step"],
            "lora_params": rows[0]["lora_params"],
        }
    return summary


def best_ratio(summary: dict[str, Any], ratios: list[float]) -> float:
    return max(ratios, key=lambda r: summary[method_key(r)]["val_acc"]["mean"])


def render(results: dict[str, Any]) -> str:
    env, setup = results["env"], results["setup"]
    summary = results.get("summary") or summarize(results["runs"], setup["ratios"])  # a stopped study: what ran
    lora = summary["lora"]
    lines = [
        "# IST update ratio on the tweet task (all-MiniLM-L6-v2 + LoRA, CPU)",
        "",
        f"CPU run ({env['device']}, {env['torch_threads']} torch thread(s), torch {env['torch']}, {env['date'][:10]})"
        f" on a 6-layer model: all-MiniLM-L6-v2 with peft LoRA r=8 (alpha 16) on every Linear of the encoder"
        f" blocks, tweet sentiment (3 classes, 1,000 validation tweets, majority class 0.42), {setup['steps']} steps"
        f" of 16 x 48 tokens, AdamW lr {LORA_LR:g}; IST with `interval=10, n_candidates=3, candidate_ratio=0.5,"
        f" suppression=0.25, reward_lr=10` (as in `fidelity.py`); the optimizer state of a layer's LoRA that stops"
        f" training is {'released (restarts at each draw)' if setup.get('release_state') else 'kept (IST default)'}."
        f" Seeds {', '.join(map(str, setup['seeds']))}"
        " (initialisation, training order, IST sampling; same split). Mean ± sample std over the seeds.",
        "",
        "| method | LoRA layers trained per step | trainable params per step | val acc | vs LoRA (paired)"
        " | fit time | per seed |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for key, s in summary.items():
        rows = [r for r in results["runs"] if r["method"] == key]
        share = s["trainable_params_per_step"] / lora["trainable_params_per_step"]
        diff = s["val_acc_minus_lora"]
        paired = "-" if key == "lora" or diff is None else f"{100 * diff['mean']:+.1f} ± {100 * diff['std']:.1f} pt"
        per_seed = ", ".join(f"{r['val_acc']:.3f}" for r in rows)
        lines.append(
            f"| {method_label(s['update_ratio'])} | {s['layers_trained_per_step']} of 6"
            f" | {s['trainable_params_per_step']:,} ({share:.0%} of LoRA's)"
            f" | {s['val_acc']['mean']:.3f} ± {s['val_acc']['std']:.3f} | {paired}"
            f" | {s['fit_seconds']['mean']:.0f} ± {s['fit_seconds']['std']:.0f} s | {per_seed} |"
        )
    long_runs = results.get("long_runs") or []
    if long_runs:
        lines += [
            "",
            f"Longer run: {setup['long_steps']} steps, seed {setup['long_seed']}.",
            "",
            "| method | trainable params per step | val acc | vs LoRA | fit time |",
            "|---|---:|---:|---:|---:|",
        ]
        long_lora = next((r["val_acc"] for r in long_runs if r["method"] == "lora"), None)
        for r in long_runs:
            diff = "-" if r["method"] == "lora" or long_lora is None else f"{100 * (r['val_acc'] - long_lora):+.1f} pt"
            lines.append(
                f"| {method_label(r['update_ratio'])} | {r['trainable_params_per_step']:,} | {r['val_acc']:.3f}"
                f" | {diff} | {r['fit_seconds']:.0f} s |"
            )
    lines += [
        "",
        "Trainable params per step: elements that received a gradient (max over steps), the classification head"
        f" ({lora['trainable_params_per_step'] - lora['lora_params']:,}) included; LoRA holds"
        f" {lora['lora_params']:,} in all. `int(ratio * 6)` layers train, so 0.75 trains 4 of 6. Fit time: training"
        " + one validation pass, including IST's 3 scoring forwards every 10 steps; on a shared machine it is"
        f" indicative only (1-min load average {env['load_average_1min']} at the start). Total run time"
        f" {results['total_seconds'] / 60:.0f} min.",
        "",
        "## Findings",
        "",
        *findings(results),
    ]
    return "\n".join(lines) + "\n"


def findings(results: dict[str, Any]) -> list[str]:
    """A short plain summary of the numbers (regenerated with the tables)."""
    setup = results["setup"]
    summary = results.get("summary") or summarize(results["runs"], setup["ratios"])
    lora = summary["lora"]
    ist_keys = [k for k in summary if k != "lora"]
    parts = []
    for key in ist_keys:
        s = summary[key]
        diff = s["val_acc_minus_lora"]["mean"]
        parts.append(f"{s['val_acc']['mean']:.3f} at {s['update_ratio']:g} ({100 * diff:+.1f} points)")
    text = [
        f"- After {setup['steps']} steps plain LoRA reaches {lora['val_acc']['mean']:.3f} ±"
        f" {lora['val_acc']['std']:.3f}; IST + LoRA reaches {', '.join(parts)}, paired over the same"
        f" {len(setup['seeds'])} seeds.",
    ]
    fastest = min(ist_keys, key=lambda k: summary[k]["fit_seconds"]["mean"])
    text.append(
        f"- IST trains {summary[ist_keys[0]]['trainable_params_per_step']:,} to"
        f" {summary[ist_keys[-1]]['trainable_params_per_step']:,} parameters per step against LoRA's"
        f" {lora['trainable_params_per_step']:,}; its fastest fit ({summary[fastest]['update_ratio']:g}) takes"
        f" {summary[fastest]['fit_seconds']['mean']:.0f} s against LoRA's {lora['fit_seconds']['mean']:.0f} s (every"
        " run pays the full forward and the validation pass; the backward stops at the lowest trained layer)."
    )
    long_runs = results.get("long_runs") or []
    if long_runs:
        base = next((r["val_acc"] for r in long_runs if r["method"] == "lora"), None)
        accs = ", ".join(
            f"IST {r['update_ratio']:g} {r['val_acc']:.3f}"
            + ("" if base is None else f" ({100 * (r['val_acc'] - base):+.1f} points)")
            for r in long_runs
            if r["method"] != "lora"
        )
        lora_text = "" if base is None else f"plain LoRA reaches {base:.3f}, "
        text.append(f"- With {setup['long_steps']} steps (seed {setup['long_seed']}, one run each) {lora_text}{accs}.")
    text.append(
        "- This is a CPU run on a 6-layer model, where each ratio is a whole number of layers (0.25 is a single"
        " layer per step); on deeper models the same ratio trains several layers per step."
    )
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="seeds of the short runs")
    parser.add_argument("--steps", type=int, default=LANGUAGE_STEPS, help="optimizer steps of the short runs")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS), help="IST update ratios")
    parser.add_argument("--long-steps", type=int, default=LONG_STEPS, help="steps of the longer run (0: skip it)")
    parser.add_argument("--long-seed", type=int, default=LANGUAGE_SEED, help="seed of the longer run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a busy 2-core machine)")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument(
        "--release-state",
        action="store_true",
        help="IST(release_optimizer_state=True): LoRA state restarts at each draw (results get a _released_state name)",
    )
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = NAME + ("_released_state" if args.release_state else "")
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    if args.render:
        write_markdown(md_path, render(json.loads(json_path.read_text())))
        return
    ratios = sorted(args.ratios)
    results: dict[str, Any] = {
        "env": environment(packages=("transformers",)),
        "setup": {
            "model": MODEL,
            "steps": args.steps,
            "seeds": args.seeds,
            "ratios": ratios,
            "long_steps": args.long_steps,
            "long_seed": args.long_seed,
            "lora": LORA_CONFIG,
            "lr": LORA_LR,
            "ist": IST_SETTINGS,
            "release_state": args.release_state,
        },
        "runs": [],
        "long_runs": [],
    }
    start = time.perf_counter()

    def record(run: dict[str, Any], where: list[dict[str, Any]]) -> None:
        where.append(run)
        results["total_seconds"] = round(time.perf_counter() - start, 1)
        write_json(json_path, results)  # after every run: a stopped study keeps its runs
        print(json.dumps(run), flush=True)

    data = tweet_data()
    with tempfile.TemporaryDirectory() as root:
        for seed in args.seeds:
            for ratio in [None, *ratios]:
                print(f"{method_key(ratio)}, seed {seed}, {args.steps} steps ...", flush=True)
                record(run_one(data, ratio, seed, args.steps, root, args.release_state), results["runs"])
        results["summary"] = summarize(results["runs"], ratios)
        if args.long_steps > 0:
            long_ratios = sorted({RATIOS[0], best_ratio(results["summary"], ratios)})
            for ratio in [None, *long_ratios]:
                print(f"{method_key(ratio)}, seed {args.long_seed}, {args.long_steps} steps ...", flush=True)
                record(
                    run_one(data, ratio, args.long_seed, args.long_steps, root, args.release_state),
                    results["long_runs"],
                )
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    write_json(json_path, results)
    write_markdown(md_path, render(results))
    print(render(results))


if __name__ == "__main__":
    main()
