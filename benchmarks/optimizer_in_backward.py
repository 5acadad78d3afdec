"""Peak gradient memory and step time with the optimizer step in backward, against the usual step after backward.

A small Llama-style causal LM (transformers ``LlamaConfig``, random weights, random token ids, next-token loss)
trains through a real Lightning ``Trainer`` with ``torch.optim.AdamW``, four ways, interleaved in rounds:

* ``full`` / ``full_in_backward``: full fine-tuning, without and with
  :class:`~lightning_peft.callbacks.OptimizerInBackward`;
* ``lisa`` / ``lisa_in_backward``: ``LISA(n_layers=2, interval=3)``, without and with it.

Measured per run:

* *peak gradient bytes*: the most bytes of live ``.grad`` tensors at any moment of a step, counted from a
  ``register_post_accumulate_grad_hook`` on every parameter, registered before the callback's own hooks (so it sees
  each gradient the moment it completes, before its step frees it), summing the ``.grad`` of every parameter;
* *step time*: wall time from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward with the
  per-parameter steps, the optimizer step), median over the timed steps of all rounds;
* the largest trainable parameter's bytes and the bytes of all trainable parameters, for reference: with the step
  in backward the peak should be about the first, without it the second;
* the largest difference of any weight from the run without the callback after the same steps (the same seed).

    python -m benchmarks.optimizer_in_backward           # about a minute on one core (5 rounds)
    python -m benchmarks.optimizer_in_backward --tiny    # seconds (tests/benchmarks/ runs it)

Results: ``benchmarks/results/optimizer_in_backward_cpu.{json,md}``. One torch thread by default (the steadiest on a
shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_peft.callbacks import LISA, OptimizerInBackward

from .harness import RESULTS_DIR, environment, llama_config, quiet_cpu_trainer, write_results

METHODS = ("full", "full_in_backward", "lisa", "lisa_in_backward")
LABELS = {
    "full": "Full fine-tuning",
    "full_in_backward": "Full fine-tuning + OptimizerInBackward",
    "lisa": "LISA (2 blocks, K=3)",
    "lisa_in_backward": "LISA (2 blocks, K=3) + OptimizerInBackward",
}
#: (hidden, layers, heads, KV heads, intermediate, vocab, batch, tokens)
SIZES = {
    "cpu": dict(hidden=256, layers=8, heads=4, kv_heads=2, intermediate=688, vocab=4096, batch=2, tokens=128),
    "tiny": dict(hidden=32, layers=4, heads=2, kv_heads=1, intermediate=64, vocab=64, batch=2, tokens=16),
}


class LlamaLM(pl.LightningModule):
    """A randomly initialised Llama-style causal LM trained on one fixed batch of random token ids."""

    def __init__(self, size: dict[str, int], steps: int) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        config = llama_config(size, max(size["tokens"], 128), tie_word_embeddings=False, use_cache=False)
        self.model = LlamaForCausalLM(config)
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, size["vocab"], (size["batch"], size["tokens"]), generator=generator)
        self.steps = steps

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)

    def train_dataloader(self) -> Any:
        return RepeatedBatch(self.tokens, self.steps)


class RepeatedBatch:
    """The same batch, ``length`` times: synthetic data with no loading cost."""

    def __init__(self, batch: Tensor, length: int) -> None:
        self.batch, self.length = batch, length

    def __iter__(self) -> Any:
        return (self.batch for _ in range(self.length))

    def __len__(self) -> int:
        return self.length


class GradientPeak(Callback):
    """Peak bytes of live ``.grad`` tensors during each step, and the step's wall time.

    Its hooks are registered in ``setup``, before OptimizerInBackward registers its own in ``on_train_start``, so
    they run first: each sees the gradient that just completed, and every other one still alive.
    """

    def __init__(self) -> None:
        self.peaks: list[int] = []
        self.times: list[float] = []
        self._peak = 0
        self._start = 0.0
        self._handles: list[Any] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        params = [p for p in pl_module.parameters() if p.requires_grad]

        def count(_: Tensor) -> None:
            live = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
            self._peak = max(self._peak, live)

        self._handles = [p.register_post_accumulate_grad_hook(count) for p in params]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self._peak = 0
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.peaks.append(self._peak)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def run_method(method: str, size: dict[str, int], steps: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """One fit of ``steps`` steps; returns the measurements and the final weights."""
    torch.manual_seed(0)
    module = LlamaLM(size, steps)
    probe = GradientPeak()
    callbacks: list[Callback] = [probe]
    if method.startswith("lisa"):
        callbacks.append(LISA(n_layers=2, interval=3, seed=0, plot=False))
    if method.endswith("in_backward"):
        callbacks.append(OptimizerInBackward())
    trainable = [p for p in module.parameters() if p.requires_grad]
    row = {
        "largest_parameter_bytes": max(p.numel() * p.element_size() for p in trainable),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
    }
    quiet_cpu_trainer("/tmp/optimizer_in_backward", callbacks, max_steps=steps).fit(module)
    row |= {"peak_grad_bytes": max(probe.peaks), "step_s": probe.times}
    return row, {n: p.detach().clone() for n, p in module.named_parameters()}


def run(
    mode: str = "cpu", rounds: int = 5, steps: int = 6, warmup: int = 2, threads: int = 1, out_dir: Path = RESULTS_DIR
) -> dict[str, Any]:
    """Run every method ``rounds`` times (order rotating per round); write and return the results."""
    torch.set_num_threads(threads)
    size = SIZES[mode]
    rows: dict[str, dict[str, Any]] = {}
    for round_index in range(rounds):
        order = METHODS[round_index % len(METHODS) :] + METHODS[: round_index % len(METHODS)]
        weights = {}
        for method in order:
            row, weights[method] = run_method(method, size, steps)
            entry = rows.setdefault(method, {**row, "step_s": []})
            entry["step_s"] += row["step_s"][warmup:]
            entry["peak_grad_bytes"] = max(entry["peak_grad_bytes"], row["peak_grad_bytes"])
        for method in ("full_in_backward", "lisa_in_backward"):
            plain = weights[method.removesuffix("_in_backward")]
            diff = max((weights[method][n] - w).abs().max().item() for n, w in plain.items())
            rows[method]["max_weight_difference"] = max(rows[method].get("max_weight_difference", 0.0), diff)
    for row in rows.values():
        row["step_median_s"] = statistics.median(row["step_s"])
        row["step_min_s"] = min(row["step_s"])
    results = {
        "environment": environment(packages=("transformers", "bitsandbytes")),
        "mode": mode,
        "size": size,
        "schedule": {"rounds": rounds, "steps": steps, "warmup": warmup, "optimizer": "torch.optim.AdamW lr 1e-4"},
        "rows": rows,
    }
    write_results(out_dir, f"optimizer_in_backward_{mode}", results, to_markdown)
    return results


def to_markdown(results: dict[str, Any]) -> str:
    rows, size, env, schedule = results["rows"], results["size"], results["environment"], results["schedule"]
    mib = 2**20
    lines = [
        "# Optimizer step in backward: peak gradient memory and step time (CPU)",
        "",
        f"Llama-style causal LM, hidden {size['hidden']}, {size['layers']} layers, {size['heads']} heads"
        f" ({size['kv_heads']} KV), intermediate {size['intermediate']}, vocab {size['vocab']}, untied head,"
        f" {size['batch']} x {size['tokens']} tokens, fp32, AdamW; {schedule['rounds']} round(s) of {schedule['steps']}"
        f" steps ({schedule['warmup']} warm-up untimed), methods interleaved.",
        f"Measured {env['date']} on {env['device']} ({env['cpu_count']} CPUs, load {env.get('load_average_1min')},"
        f" {env['torch_threads']} torch thread(s)), torch {env['torch']}, lightning {env['lightning']}.",
        "",
        "| Method | Peak gradient bytes (MiB) | x without | Largest trainable parameter (MiB)"
        " | All that may train (MiB) | Step time median (ms) | x without | min (ms) | Max weight difference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        row = rows[method]
        base = rows[method.removesuffix("_in_backward")]
        in_backward = method.endswith("_in_backward")
        peak_ratio = f"{row['peak_grad_bytes'] / base['peak_grad_bytes']:.2f}" if in_backward else "1.00"
        time_ratio = f"{row['step_median_s'] / base['step_median_s']:.2f}" if in_backward else "1.00"
        difference = f"{row['max_weight_difference']:.1e}" if in_backward else "-"
        lines.append(
            f"| {LABELS[method]} | {row['peak_grad_bytes'] / mib:.2f} | {peak_ratio}"
            f" | {row['largest_parameter_bytes'] / mib:.2f} | {row['trainable_bytes'] / mib:.2f}"
            f" | {row['step_median_s'] * 1e3:.1f} | {time_ratio} | {row['step_min_s'] * 1e3:.1f} | {difference} |"
        )
    lines += [
        "",
        "Peak gradient bytes: the most bytes of live `.grad` tensors at any moment of a step (max over the steps),"
        " counted by post-accumulate-grad hooks that run before each parameter's step. LISA's peak is that of the"
        " step with the most trainable bytes (embeddings and head always train). All that may train: every parameter"
        " with `requires_grad` when training starts (LISA trains a part of it at each step). Max weight difference:"
        " largest absolute difference of any weight from the run without the callback after the same steps. Step"
        " times of a shared 2-core machine: differences under about 15 % are noise.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and one short round (seconds)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    mode = "tiny" if args.tiny else "cpu"
    rounds = args.rounds if args.rounds is not None else (1 if args.tiny else 5)
    results = run(mode, rounds=rounds, steps=args.steps, threads=args.threads, out_dir=args.out_dir)
    print(to_markdown(results))


if __name__ == "__main__":
    main()
