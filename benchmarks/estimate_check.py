"""The memory estimate of ``lightning_peft.estimate`` against the counted memory of ``memory.py``'s real steps.

For every model and method of a committed ``results/memory_<sizes>.json``, the estimate is made for the same
model, batch, thresholds and method (on the meta device, fake tensors, no step) and compared per component and in
total. Rows the estimator does not model are listed as such (``lisa_kept``: LISA with the state of every sampled
block kept, whose optimizer state depends on the sampling history; the peers BAdam, GaLore and CPU offload).
With checkpointing, ``memory.py`` counts what the forward leaves saved (block inputs and what lies outside the
blocks); the estimate's one block recomputed in backward is shown apart and left out of the comparison.

    python -m benchmarks.estimate_check                                   # results/memory_cpu.json, ~30 s
    python -m benchmarks.estimate_check --results memory_cpu_activations
    python -m benchmarks.estimate_check --results memory_cpu_peers        # the peers' run (checkpointing rows)

Results: ``results/estimate_check_<results without memory_>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from lightning_peft.estimate import estimate_memory
from lightning_peft.methods import get_method

from . import memory
from .harness import RESULTS_DIR, write_results

COMPONENTS = {
    "param_bytes": "params",
    "grad_bytes": "grads",
    "optimizer_state_bytes": "optimizer_state",
    "saved_activation_bytes": "saved_activations",
}
TOLERANCE = 0.05


def run(results_name: str = "memory_cpu", out_dir: str | Path | None = None, device: str = "cpu") -> dict[str, Any]:
    """Compare every row of ``results/<results_name>.json`` with its estimate; write and return the comparison."""
    measured = json.loads((RESULTS_DIR / f"{results_name}.json").read_text())
    sizes = measured["sizes"]
    specs = {spec.key: spec for spec in memory.SIZES[sizes]}
    thresholds = memory.SMALL_TENSORS[sizes]
    results: dict[str, Any] = {"results": results_name, "sizes": sizes, "tolerance": TOLERANCE, "models": {}}
    recipes = memory.recipes()
    schedule = memory.SCHEDULES[sizes]
    # the methods of memory.py's runs with their settings there, each once (LISA's with its seed and n_layers)
    estimated = {}
    for recipe in recipes.values():
        if recipe.estimator_row() is not None:
            estimated.setdefault(recipe.method, recipe.entry(schedule=schedule))
    activations = get_method("activation_quantization").configure(
        group_size=memory.QUANT_GROUP_SIZE, min_numel=thresholds.min_numel
    )
    for key, model in measured["models"].items():
        spec = specs[key]
        started = time.perf_counter()
        report = estimate_memory(
            lambda spec=spec: memory.BenchModule(memory.build_model(spec, "full"), spec.family),
            memory.make_batch(spec, torch.device("cpu")),
            precision=measured["precision"],
            methods=list(estimated.values()),
            variants=["", "int8_act", "int8_act+adamw8bit", "checkpointing", "int8_act+checkpointing"],
            loss_fn=lambda module, batch: module.loss(batch),
            activations=activations,
            min_8bit_size=thresholds.min_8bit_size,
            device=device,
        )
        rows = {}
        for method, summary in model["methods"].items():
            row_key = recipes[method].estimator_row() if method in recipes else None
            if row_key is None:
                rows[method] = {"modelled": False}
                continue
            row = report.row(row_key)
            components = {
                name: {"measured": summary["components"][name], "estimated": getattr(row, attr)}
                for name, attr in COMPONENTS.items()
            }
            total = summary["components_total_bytes"]
            counted = row.held - row.recomputed  # what memory.py counts (the sum): no recomputed block
            rows[method] = {
                "modelled": True,
                "estimate_row": row_key,
                "components": components,
                "measured_total": total,
                "estimated_total": counted,
                "recomputed": row.recomputed,
                "ratio": counted / total,
            }
            if summary.get("gpu_peak_timed_bytes"):  # --mode gpu: the allocator's peak, recomputed block included
                rows[method]["gpu_peak"] = summary["gpu_peak_timed_bytes"]
                rows[method]["peak_ratio"] = row.total / summary["gpu_peak_timed_bytes"]
        results["models"][key] = {
            "label": model["label"],
            "estimate_seconds": time.perf_counter() - started,
            "rows": rows,
        }
    modelled = [r for m in results["models"].values() for r in m["rows"].values() if r["modelled"]]
    results["worst_ratio_error"] = max(abs(r["ratio"] - 1) for r in modelled)
    results["all_within_tolerance"] = results["worst_ratio_error"] <= TOLERANCE
    stem = "estimate_check_" + results_name.removeprefix("memory_")
    write_results(out_dir if out_dir is not None else RESULTS_DIR, stem, results, render_markdown)
    return results


def render_markdown(results: dict[str, Any]) -> str:
    """One table per model: estimated over measured, per component and in total."""
    lines = [
        f"# Memory estimate against `memory.py`'s counted memory (`{results['results']}.json`)",
        "",
        "Estimate: `lightning_peft.estimate.estimate_memory` (meta device, fake tensors, no step), with the"
        " benchmark's models, batches, thresholds and method settings. Generated by `python"
        f" -m benchmarks.estimate_check --results {results['results']}`.",
    ]
    for model in results["models"].values():
        lines += [
            "",
            f"## {model['label']} (estimated in {model['estimate_seconds']:.1f} s)",
            "",
            "| Method | Estimate row | Params | Grads | Optimizer state | Saved activations | Total (MiB) measured"
            " | Total estimated | Estimated / measured | Recomputed block, not in the totals (MiB) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for method, row in model["rows"].items():
            label = memory.label(method)
            if not row["modelled"]:
                lines.append(f"| {label} | not modelled | | | | | | | | |")
                continue
            cells = []
            for name in COMPONENTS:
                c = row["components"][name]
                cells.append(f"{c['estimated'] / c['measured']:.3f}" if c["measured"] else "-")
            lines.append(
                f"| {label} | `{row['estimate_row']}` | {' | '.join(cells)}"
                f" | {row['measured_total'] / 2**20:.1f} | {row['estimated_total'] / 2**20:.1f} | {row['ratio']:.3f}"
                f" | {row['recomputed'] / 2**20:.1f} |"
            )
    peaks = [
        f"{memory.label(method)} {row['peak_ratio']:.2f}"
        for model in results["models"].values()
        for method, row in model["rows"].items()
        if row.get("peak_ratio")
    ]
    if peaks:
        lines += ["", "Estimated total (recomputed block included) / CUDA allocator peak: " + "; ".join(peaks) + "."]
    mark = "met" if results["all_within_tolerance"] else "NOT met"
    lines += [
        "",
        "Components are estimated / measured. Target: every modelled row's total within"
        f" {results['tolerance']:.0%} of the measurement: worst {results['worst_ratio_error']:.1%} -> **{mark}**.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="memory_cpu", help="a results/<NAME>.json of memory.py")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda for memory_gpu results")
    args = parser.parse_args(argv)
    print(render_markdown(run(args.results, args.out_dir, args.device)))


if __name__ == "__main__":
    main()
