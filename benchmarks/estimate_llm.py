"""An 8B LLM on one 80 GB GPU: the memory estimate of every method and saving, side by side, and the goals checked.

``lightning-peft estimate`` on ``benchmarks/estimate/llama3_8b.yaml`` (Llama-3-8B's shape: hidden 4096, 32 layers,
32 / 8 heads, intermediate 14336, vocabulary 128256, untied head; 1 x 2048 tokens; bf16-mixed; ``--device cuda``),
twice: with the model's own loss and with ``CausalLM``'s chunked loss (``loss_chunk_size``), every method with the
same module and loss. Each LISA row is compared with LoRA's row of the same savings (checkpointing, optimizer step
in backward, AdamW8bit, 8-bit activations), and the goals are checked:

- LISA with the paper's settings (embeddings and head train) + checkpointing at most 1.15x LoRA + checkpointing;
- LISA's lightest choice (embeddings and head frozen) + checkpointing at most 1.05x LoRA + checkpointing;
- LISA's lightest choice without checkpointing at most LoRA;
- some full fine-tuning row at most 60 GiB; Half Fine-Tuning + checkpointing within 80 GiB.

The estimate counts fake tensors (no weights, no step): see ``docs/estimate.md`` for what it counts and how it was
checked against measured peaks (``benchmarks/estimate_rss.py``).

    python -m benchmarks.estimate_llm                       # about 5 minutes on 2 cores
    python -m benchmarks.estimate_llm --chunk 2048 --out-dir /tmp/x

Results: ``results/estimate_llm_<config stem>.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from lightning_peft.cli.estimate import estimate_from_config
from lightning_peft.estimate import VARIANT_LABELS, MemoryReport, estimated_methods
from lightning_peft.methods import Method, get_method

from .harness import RESULTS_DIR, environment, write_results

CONFIG = Path(__file__).resolve().parent / "estimate" / "llama3_8b.yaml"
ONE_BLOCK = "lisa_one_block"
GIB = 2**30
#: The variants of the table's columns (``""``: the method alone).
COLUMNS = (
    "",
    "checkpointing",
    "in_backward",
    "checkpointing+in_backward",
    "adamw8bit+checkpointing+in_backward",
    "int8_act+adamw8bit+checkpointing+in_backward",
)
METHODS = ("full", "lora", "lisa", "lisa_embeddings_frozen", "lisa_embeddings_head_frozen", ONE_BLOCK, "hft")
PAPER, LIGHTEST = "lisa", "lisa_embeddings_head_frozen"


def one_block_lisa() -> Method:
    """LISA's lightest choice with one block a period instead of two (AdamW state of one block)."""
    lightest = get_method("lisa").configure(n_layers=1, interval=20, embeddings="frozen", head="frozen")
    return replace(lightest, name=ONE_BLOCK, label="LISA, embeddings and head frozen, 1 block", choices={})


def _rows(report: MemoryReport) -> dict[str, dict[str, Any]]:
    return {
        row.method: {
            "largest_batch_80gib": report.largest_batch_size(row.method, 80 * GIB),
            "label": row.label,
            "params": row.params,
            "grads": row.grads,
            "optimizer_state": row.optimizer_state,
            "activations": row.activations,
            "working": row.working + row.first_grads,
            "total": row.total,
        }
        for row in report.rows
    }


def _key(method: str, variant: str) -> str:
    return method + (f"+{variant}" if variant else "")


def ratios(rows: dict[str, dict[str, Any]], method: str) -> dict[str, float]:
    """``method``'s total over LoRA's, for every variant both have."""
    out = {}
    for key, row in rows.items():
        base, _, variant = key.partition("+")
        lora = rows.get(_key("lora", variant))
        if base == method and lora is not None:
            out[variant] = row["total"] / lora["total"]
    return out


def goals(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The goals, each with the variants that meet it (LISA against LoRA with the same savings)."""
    paper, lightest, one_block = ratios(rows, PAPER), ratios(rows, LIGHTEST), ratios(rows, ONE_BLOCK)
    checkpointed = [v for v in paper if "checkpointing" in v.split("+")]
    without = [v for v in lightest if "checkpointing" not in v.split("+")]
    full = {k: r["total"] for k, r in rows.items() if k.partition("+")[0] == "full"}
    hft = {k: r["total"] for k, r in rows.items() if k.partition("+")[0] == "hft" and "checkpointing" in k}
    found = [
        ("LISA (paper) + checkpointing <= 1.15x LoRA + checkpointing", {v: paper[v] for v in checkpointed}, 1.15),
        ("LISA (lightest) + checkpointing <= 1.05x LoRA + checkpointing", {v: lightest[v] for v in checkpointed}, 1.05),
        ("LISA (lightest), no checkpointing <= 1.00x LoRA", {v: lightest[v] for v in without}, 1.00),
        (
            "LISA (lightest, 1 block) + checkpointing <= 1.05x LoRA + checkpointing",
            {v: one_block[v] for v in checkpointed if v in one_block},
            1.05,
        ),
        ("Full FT <= 60 GiB", {k.partition("+")[2]: t / GIB for k, t in full.items()}, 60.0),
        ("Half FT + checkpointing <= 80 GiB", {k.partition("+")[2]: t / GIB for k, t in hft.items()}, 80.0),
    ]
    out = []
    for name, values, limit in found:
        # fewest savings first: what it takes at least
        meeting = sorted(
            (v for v, x in values.items() if x <= limit + 1e-9), key=lambda v: (len(v.split("+")), values[v])
        )
        out.append(
            {
                "goal": name,
                "limit": limit,
                "values": values,
                "meeting": meeting,
                "met": bool(meeting),
                "plain": values.get("checkpointing", values.get("")),
            }
        )
    return out


def run(config: str | Path = CONFIG, chunk: int = 1024, device: str = "cuda", out_dir: str | Path | None = None):
    """Estimate the config with its own loss and with the chunked loss; ratios and goals; write the results."""
    started = time.perf_counter()
    losses = {
        "model loss": ["--config", str(config)],
        f"chunked loss ({chunk} tokens)": ["--config", str(config), "--model.init_args.loss_chunk_size", str(chunk)],
    }
    results: dict[str, Any] = {"config": Path(config).name, "device": device, "chunk": chunk, "losses": {}}
    for name, args in losses.items():
        report = estimate_from_config(args, device=device, methods=[*estimated_methods(), one_block_lisa()])
        rows = _rows(report)
        results["losses"][name] = {"rows": rows, "goals": goals(rows), "notes": report.notes}
    results["seconds"] = time.perf_counter() - started
    results["environment"] = environment(packages=("transformers",))
    write_results(out_dir if out_dir is not None else RESULTS_DIR, f"estimate_llm_{Path(config).stem}", results, render)
    return results


def _variant_label(variant: str) -> str:
    return "alone" if not variant else "+ " + VARIANT_LABELS.get(variant, variant)


def render(results: dict[str, Any]) -> str:
    """A table per loss (GiB and the ratio to LoRA with the same savings) and the goals."""
    lines = [
        f"# Memory estimate of an 8B LLM per method and saving ({results['config']}, `--device {results['device']}`)",
        "",
        "GiB from `lightning-peft estimate` (fake tensors, no weights, no step); in brackets the ratio to LoRA with"
        " the same savings, the same module and the same loss. The lightest LISA freezes the embeddings and the"
        " head. Generated by `python -m benchmarks.estimate_llm`"
        f" ({results['seconds']:.0f} s, {results['environment']['date']}).",
    ]
    for loss, part in results["losses"].items():
        rows = part["rows"]
        lines += ["", f"## {loss[0].upper() + loss[1:]}", ""]
        lines.append("| Method | " + " | ".join(_variant_label(v) for v in COLUMNS) + " |")
        lines.append("|---|" + "---:|" * len(COLUMNS))
        for method in METHODS:
            cells = []
            for variant in COLUMNS:
                row = rows.get(_key(method, variant))
                lora = rows.get(_key("lora", variant))
                if row is None:
                    cells.append("-")
                    continue
                ratio = f" ({row['total'] / lora['total']:.2f}x)" if lora is not None and method != "lora" else ""
                cells.append(f"{row['total'] / GIB:.1f}{ratio}")
            label = next((r["label"] for k, r in rows.items() if k == method), method)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "| Goal | With checkpointing only (or alone) | Met with (fewest savings first; the same on both sides) |",
            "|---|---:|---|",
        ]
        for goal in part["goals"]:
            unit = "x" if goal["limit"] < 10 else " GiB"
            plain = f"{goal['plain']:.2f}{unit}" if goal["plain"] is not None else "-"
            if not goal["values"]:
                met = "no row"
            elif goal["met"]:
                met = ", ".join(f"{_variant_label(v)} ({goal['values'][v]:.2f}{unit})" for v in goal["meeting"][:3])
            else:
                met = f"**not met** (best {min(goal['values'].values()):.2f}{unit})"
            lines.append(f"| {goal['goal']} | {plain} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--chunk", type=int, default=1024, help="loss_chunk_size of the chunked-loss estimate")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    print(render(run(args.config, args.chunk, args.device, args.out_dir)))


if __name__ == "__main__":
    main()
