"""The memory estimate against the measured peak memory of real training steps: resident memory on CPU, CUDA on GPU.

``benchmarks/estimate_check.py`` checks the estimator against bytes counted in a step; this script checks it against
what the process really holds. A Llama-style causal LM with Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2
key-value heads, intermediate 4864, vocabulary 151936, tied embeddings: the embedding is 28 % of the 494 M
parameters), fp32 weights (constant: the values change no byte), one sequence of random token ids, trains two steps
through a real Lightning ``Trainer`` (the second step runs with the optimizer state of the first in memory, as every
later step does), once per row, each row in a fresh Python process. ``torch.optim.AdamW(fused=True)``: the fused
kernel makes no temporaries of the parameters' size (the estimate does not count an optimizer's temporaries). Each
process reports its peak resident memory (``VmHWM`` of ``/proc/self/status``), run with
``MALLOC_MMAP_THRESHOLD_=131072`` so that freed large tensors go back to the system instead of staying in glibc's
heap (with the default dynamic threshold the peak of a 0.5 B step reads up to 2x what is in use).

The processes differ only in the row, so the difference of two peaks is the difference of what the two rows hold
at their peak; the estimate's difference of totals (``estimate_memory``, fake tensors, no step) is compared with it,
every row against one baseline row (LoRA: its gradients are tiny, so its peak is closest to the sum of the
components). Target: every predicted difference within 10 % of the measured one.

``--mode gpu`` (``bash benchmarks/run_gpu.sh benchmarks/results estimate_8b``) does the same on one CUDA GPU for
``benchmarks/estimate/llama3_8b.yaml``'s shape (Llama-3-8B: hidden 4096, 32 layers, 32 / 8 heads, intermediate 14336,
vocabulary 128256, untied head; fp32 weights built on the GPU, bf16-mixed, 1 x 2048 tokens), with the
rows that can fit 80 GB, and ``torch.cuda.max_memory_allocated()`` as the peak (the estimate for ``--device cuda``;
a row that runs out of memory is reported as such).

    python -m benchmarks.estimate_rss                      # 8 rows, 10-30 min on 2 cores, peak ~10 GB of RAM
    python -m benchmarks.estimate_rss --size tiny --rows lora full+in_backward   # a minute (tests/benchmarks/)
    python -m benchmarks.estimate_rss --mode gpu           # 8 rows of the 8B shape, ~5 min on one H100
    python -m benchmarks.estimate_rss --rows lisa_embeddings_head_frozen \
        lisa_embeddings_head_frozen+checkpointing+in_backward --suffix lisa_choices   # LISA's lightest choice

Results: ``results/estimate_rss_<size>[_<suffix>].{json,md}`` (``estimate_rss_llama3_8b_gpu`` for the GPU mode).
A tied head (this shape's) must be frozen with the token table, so LISA's ``embeddings_frozen`` choice is refused
here and ``embeddings_head_frozen`` is the one measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_peft.estimate import VARIANTS, estimate_memory
from lightning_peft.methods import get_method

from .harness import RESULTS_DIR, environment, llama_config, write_results
from .peers import adamw8bit, enable_checkpointing

#: (hidden, layers, heads, KV heads, intermediate, vocab, tokens, tied); batch 1
SIZES = {
    "cpu": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, tokens=128, tied=True),
    "tiny": dict(hidden=32, layers=4, heads=2, kv_heads=1, intermediate=64, vocab=512, tokens=16, tied=True),
    "llama3_8b": dict(
        hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256, tokens=2048, tied=False
    ),
}
#: Each row is an estimate row: method + variant (parts of :data:`lightning_peft.estimate.VARIANT_PARTS`).
ROWS = (
    "lora",
    "full",
    "full+in_backward",
    "lisa",
    "lisa+in_backward",
    "lora+checkpointing",
    "full+checkpointing+in_backward",
    "lisa+checkpointing+in_backward",
)
#: The 8B rows of the GPU mode: those whose estimate is under 80 GB (LISA alone is near it).
GPU_ROWS = (
    "lora",
    "lora+checkpointing",
    "lisa",
    "lisa+in_backward",
    "lisa+checkpointing+in_backward",
    "hft+checkpointing+in_backward",
    "full+int8_act+adamw8bit+in_backward",
    "full+adamw8bit+checkpointing+in_backward",
)
MODES = {"cpu": ("cpu", "32-true"), "gpu": ("cuda", "bf16-mixed")}
BASELINE = "lora"
TOLERANCE = 0.10
STEPS = 2
MMAP_THRESHOLD = "131072"
LISA_SETTINGS = dict(n_layers=2, interval=20, seed=0)


class LlamaLM(pl.LightningModule):
    """A randomly initialised Llama-style causal LM, its method applied, trained on one repeated batch."""

    def __init__(self, size: dict[str, Any], eight_bit: bool = False) -> None:
        super().__init__()
        self.batch = make_batch(size)
        self.eight_bit = eight_bit
        from transformers import LlamaForCausalLM

        config = llama_config(size, max(size["tokens"], 128), tie_word_embeddings=size["tied"], use_cache=False)
        from transformers.initialization import no_init_weights

        with no_init_weights():  # random initialisation costs 20 s of a busy CPU per row; the values change no byte
            self.model = LlamaForCausalLM(config)
        self.model.tie_weights()  # part of the initialisation skipped above
        with torch.no_grad():
            for param in self.model.parameters():
                param.fill_(0.02)  # every page written, as real weights would be

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.compute_loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.eight_bit:
            return adamw8bit()(params, lr=1e-5)
        return torch.optim.AdamW(params, lr=1e-5, fused=True)

    def train_dataloader(self) -> Any:
        return RepeatedBatch(self.batch, STEPS)


class RepeatedBatch:
    """The same batch, ``length`` times: synthetic data with no loading cost."""

    def __init__(self, batch: dict[str, Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __iter__(self) -> Any:
        return (self.batch for _ in range(self.length))

    def __len__(self) -> int:
        return self.length


def make_batch(size: dict[str, Any]) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, size["vocab"], (1, size["tokens"]), generator=generator, device="cpu")
    return {"input_ids": tokens}  # on the host, as a data loader gives it (also under a `torch.device` context)


def _method(name: str) -> Any:
    """The registry's method ``name``; LISA and its choices (``lisa_embeddings_frozen``) with ``LISA_SETTINGS``."""
    if not name.startswith("lisa"):
        return get_method(name)
    lisa = get_method("lisa").configure(**LISA_SETTINGS)
    return lisa if name == "lisa" else next(m for m in lisa.alternatives() if m.name == name)


def _size_of(mode: str, size_name: str | None) -> str:
    return size_name or ("llama3_8b" if mode == "gpu" else "cpu")


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure_row(row: str, size_name: str, mode: str = "cpu") -> dict[str, Any]:
    """One row in this process: build, apply the method, train ``STEPS`` steps; the peak memory.

    CPU: the peak resident memory of the process (``VmHWM``); GPU: ``torch.cuda.max_memory_allocated()``, or
    ``"out_of_memory": True`` with the peak reached before the failing allocation.
    """
    size = SIZES[size_name]
    device, precision = MODES[mode]
    method, _, variant = row.partition("+")
    parts = variant.split("+") if variant else []
    torch.manual_seed(0)
    with torch.device(device):  # on a GPU, the weights of 8B parameters are made there, not copied from the host
        module = LlamaLM(size, eight_bit="adamw8bit" in parts)
    callbacks: list[pl.Callback] = []
    entry = _method(method)
    if entry.callback is not None:  # LISA, Half FT: their callback decides what trains, as in a real run
        callbacks.append(entry.build_callback())
    else:
        entry.apply(module.model)
    if "int8_act" in parts:
        callbacks.append(get_method("activation_quantization").build_callback())
    if "checkpointing" in parts:
        enable_checkpointing(module.model)
    if "in_backward" in parts:
        callbacks.append(get_method("optimizer_in_backward").build_callback())
    rss_before_fit = _status("VmRSS")
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=STEPS,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir="/tmp/estimate_rss",
        callbacks=callbacks,
    )
    started = time.perf_counter()
    result: dict[str, Any] = {"row": row, "out_of_memory": False}
    try:
        trainer.fit(module)
    except torch.OutOfMemoryError:
        result["out_of_memory"] = True
    result |= {
        "peak": torch.cuda.max_memory_allocated() if device == "cuda" else _status("VmHWM"),
        "rss_before_fit": rss_before_fit,
        "fit_seconds": time.perf_counter() - started,
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
    return result


def _measure_in_fresh_process(row: str, size_name: str, mode: str, threads: int) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "benchmarks.estimate_rss", "--child", row, "--size", size_name, "--mode", mode]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"row {row!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def estimate_rows(size_name: str, rows: list[str], mode: str = "cpu") -> dict[str, Any]:
    """The estimate of every row (fake tensors, no step)."""
    size = SIZES[size_name]
    device, precision = MODES[mode]
    methods = list(dict.fromkeys(r.partition("+")[0] for r in rows))
    variants = list(dict.fromkeys(r.partition("+")[2] for r in rows))
    report = estimate_memory(
        lambda: LlamaLM(size),
        make_batch(size),
        precision=precision,
        methods=[_method(m) for m in methods],
        variants=variants,
        device=device,
        choices=False,
    )
    return {row: report.row(row) for row in rows}


def run(
    size_name: str | None = None,
    rows: list[str] | None = None,
    out_dir: str | Path | None = None,
    threads: int = 2,
    mode: str = "cpu",
    measured_from: str | Path | None = None,
    suffix: str = "",
) -> dict[str, Any]:
    """Measure every row in a fresh process, estimate it, compare the differences to the baseline; write results.

    With ``measured_from`` (a results JSON of this script), its measurements are compared with a new estimate
    instead of measuring again (``seconds`` then stays that run's).
    """
    size_name = _size_of(mode, size_name)
    rows = list(rows or (GPU_ROWS if mode == "gpu" else ROWS))
    if BASELINE not in rows:
        rows.insert(0, BASELINE)
    started = time.perf_counter()
    measured_keys = ("row", "out_of_memory", "peak", "rss_before_fit", "fit_seconds", "trainable_params")
    if measured_from is not None:
        stored = json.loads(Path(measured_from).read_text())
        rows = list(stored["rows"])
        measured = {
            row: {k: stored["rows"][row].get(k) for k in (*measured_keys, "malloc_mmap_threshold")} for row in rows
        }
        started -= stored["seconds"]
    else:
        # the measurements first: nothing of this process is on the GPU while they run
        measured = {row: _measure_in_fresh_process(row, size_name, mode, threads) for row in rows}
    estimates = estimate_rows(size_name, rows, mode)
    base, base_estimate = measured[BASELINE]["peak"], estimates[BASELINE].total
    results: dict[str, Any] = {
        "mode": mode,
        "size": size_name,
        "shape": SIZES[size_name],
        "baseline": BASELINE,
        "tolerance": TOLERANCE,
        "steps": STEPS,
        "malloc_mmap_threshold": MMAP_THRESHOLD,
        "rows": {},
    }
    for row in rows:
        estimate = estimates[row]
        predicted = estimate.total - base_estimate
        observed = measured[row]["peak"] - base
        error = abs(predicted - observed) / abs(observed) if row != BASELINE and observed else 0.0
        if measured[row]["out_of_memory"]:
            error = float("inf") if estimate.total < 80 * 10**9 else 0.0  # predicted not to fit: agreed
        results["rows"][row] = {
            "label": estimate.label,
            "estimated": {
                "params": estimate.params,
                "grads": estimate.grads,
                "optimizer_state": estimate.optimizer_state,
                "activations": estimate.activations,
                "working": estimate.working + estimate.first_grads,
                "total": estimate.total,
            },
            **measured[row],
            "predicted_difference": predicted,
            "measured_difference": observed,
            "relative_error": error,
            "estimated_over_peak": estimate.total / measured[row]["peak"],
        }
    compared = [r for name, r in results["rows"].items() if name != BASELINE]
    results["worst_relative_error"] = max((r["relative_error"] for r in compared), default=0.0)
    results["all_within_tolerance"] = results["worst_relative_error"] <= TOLERANCE
    results["seconds"] = time.perf_counter() - started
    results["estimated_again"] = measured_from is not None
    results["environment"] = (
        stored["environment"]
        if measured_from is not None
        else environment(torch.device("cuda") if mode == "gpu" else None, packages=("transformers", "bitsandbytes"))
    )
    stem = f"estimate_rss_{size_name}" + ("_gpu" if mode == "gpu" else "") + (f"_{suffix}" if suffix else "")
    write_results(out_dir if out_dir is not None else RESULTS_DIR, stem, results, render_markdown)
    return results


def render_markdown(results: dict[str, Any]) -> str:
    """The rows: estimated components, the measured peak, and predicted against measured differences."""
    shape = results["shape"]
    gpu = results.get("mode") == "gpu"
    mib = 2**20
    peak = (
        "`torch.cuda.max_memory_allocated()`, weights built on the GPU; bf16-mixed"
        if gpu
        else "peak resident memory = `VmHWM` of `/proc/self/status`, with"
        f" `MALLOC_MMAP_THRESHOLD_={results['malloc_mmap_threshold']}`; fp32"
    )
    lines = [
        f"# Memory estimate against the measured peak memory of real steps ({'GPU' if gpu else 'CPU'})",
        "",
        f"A Llama-style LM of hidden {shape['hidden']}, {shape['layers']} layers, {shape['heads']} heads /"
        f" {shape['kv_heads']} KV heads, intermediate {shape['intermediate']}, vocabulary {shape['vocab']},"
        f" {'tied' if shape['tied'] else 'untied'} embeddings; batch 1 x {shape['tokens']} tokens; AdamW (fused) or"
        f" AdamW8bit where named; {results['steps']} steps through a Lightning Trainer, each row in a fresh process;"
        f" {peak}. Differences are against the `{results['baseline']}` row. Generated by `python -m"
        f" benchmarks.estimate_rss --mode {results.get('mode', 'cpu')} --size {results['size']}`"
        f" ({results['seconds']:.0f} s; {results['environment']['device']})"
        + (
            "; the estimate recomputed for these measurements with `--measured`."
            if results.get("estimated_again")
            else "."
        )
        + " Estimated total = params + optimizer + the larger of activations + working (start of backward) and"
        " grads (its end).",
        "",
        "| Row | Estimated params / grads / optimizer / activations / working (MiB) | Estimated total (MiB)"
        " | Peak (MiB) | Predicted difference (MiB) | Measured difference (MiB) | Error | Estimated / peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["rows"].items():
        e = row["estimated"]
        keys = ("params", "grads", "optimizer_state", "activations", "working")
        parts = " / ".join(f"{e.get(k, 0) / mib:.0f}" for k in keys)
        error = "baseline" if name == results["baseline"] else f"{row['relative_error']:.1%}"
        oom = " (out of memory)" if row["out_of_memory"] else ""
        lines.append(
            f"| {row['label']} | {parts} | {e['total'] / mib:.0f} | {row['peak'] / mib:.0f}{oom}"
            f" | {row['predicted_difference'] / mib:+.0f} | {row['measured_difference'] / mib:+.0f} | {error}"
            f" | {row['estimated_over_peak']:.2f} |"
        )
    mark = "met" if results["all_within_tolerance"] else "NOT met"
    lines += [
        "",
        f"Target: every predicted difference within {results['tolerance']:.0%} of the measured one: worst"
        f" {results['worst_relative_error']:.1%} -> **{mark}**.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``--child ROW``: measure one row in this process and print its JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    lisa_choices = [m.name for m in get_method("lisa").alternatives()]
    rows = [f"{m}+{v}".rstrip("+") for m in ("full", "lora", "lisa", *lisa_choices, "hft") for v in VARIANTS]
    parser.add_argument("--mode", choices=sorted(MODES), default="cpu", help="gpu: one CUDA GPU, the 8B shape")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: cpu, or llama3_8b on GPU")
    parser.add_argument("--rows", nargs="+", choices=rows, default=None, metavar="ROW", help="e.g. lisa+in_backward")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--measured", default=None, help="a results JSON of this script: estimate again, no steps")
    parser.add_argument("--suffix", default="", help="results file name suffix, e.g. lisa_choices")
    parser.add_argument("--child", choices=rows, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode == "gpu" and not torch.cuda.is_available():
        print("--mode gpu needs a CUDA GPU; none is visible. Skipped.")
        return
    if args.child is not None:
        print(json.dumps(measure_row(args.child, _size_of(args.mode, args.size), args.mode)))
        return
    results = run(args.size, args.rows, args.out_dir, args.threads, args.mode, args.measured, args.suffix)
    print(render_markdown(results))


if __name__ == "__main__":
    main()
