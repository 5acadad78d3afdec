"""What LISA's frozen prefix saves: bytes saved for backward and step time of a tiny Llama-style model on the CPU.

LISA trains two blocks of eight (blocks 5 and 6: five frozen blocks below the lowest trained one). Each row is a
forward + backward of :class:`~lightning_peft.modules.CausalLM` on one batch:

* ``embeddings always`` -- the paper's default: the token table trains, so the graph runs through every block;
* ``embeddings frozen`` -- nothing below block 5 requires grad: autograd records nothing there by itself;
* ``... + input marked`` -- the embedding output is marked as requiring grad, as transformers' activation
  checkpointing does (``enable_input_require_grads``): the frozen blocks build their graph again;
* ``... + checkpointing`` -- transformers' activation checkpointing of every block (non-reentrant): the frozen
  blocks are recomputed in backward;
* ``... + no-grad prefix`` -- the same with LISA's :class:`~lightning_peft.frozen_prefix.FrozenPrefix` on
  blocks 0-4.

Saved bytes count each storage autograd keeps for backward once, parameters excluded
(:class:`benchmarks.harness.SavedTensorCounter`); time is the median over rounds, the configurations interleaved
in each round, one torch thread.

    python -m benchmarks.lisa_frozen_prefix                 # under 2 minutes on a busy 2-core machine
    python -m benchmarks.lisa_frozen_prefix --rounds 2 --out-dir /tmp/p

Results: ``benchmarks/results/lisa_frozen_prefix_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lightning_peft.frozen_prefix import FrozenPrefix
from lightning_peft.modules import CausalLM

from .harness import RESULTS_DIR, SavedTensorCounter, environment, write_results

CONFIG = {
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
TRAINED = (5, 6)
BATCH, SEQUENCE = 4, 128
# row key -> (label, embeddings train, input marked as requiring grad, checkpointing, no-grad prefix)
ROWS: dict[str, tuple[str, bool, bool, bool, bool]] = {
    "always": ("embeddings always", True, False, False, False),
    "frozen": ("embeddings frozen", False, False, False, False),
    "marked": ("embeddings frozen + input marked", False, True, False, False),
    "marked_prefix": ("embeddings frozen + input marked + no-grad prefix", False, True, False, True),
    "checkpointing": ("embeddings frozen + checkpointing", False, True, True, False),
    "checkpointing_prefix": ("embeddings frozen + checkpointing + no-grad prefix", False, True, True, True),
}


def build(row: str) -> tuple[CausalLM, FrozenPrefix | None]:
    """The module of ``row``: LISA's trainable set (blocks 5, 6, final norm, head; the embeddings if they train)."""
    _, embeddings, marked, checkpointing, prefix = ROWS[row]
    torch.manual_seed(0)
    module = CausalLM(config=CONFIG).train()  # Llama has no dropout: every row computes the same numbers
    network = module.model
    if checkpointing:
        network.gradient_checkpointing_enable()  # marks the embedding output too
    elif marked:
        network.enable_input_require_grads()
    layers = network.model.layers
    for index, block in enumerate(layers):
        block.requires_grad_(index in TRAINED)
    network.model.embed_tokens.requires_grad_(embeddings)
    hooks = FrozenPrefix([layers[i] for i in range(min(TRAINED))]) if prefix else None
    return module, hooks


def step(module: CausalLM, batch: dict[str, torch.Tensor]) -> tuple[float, int, float]:
    """Seconds of one forward + backward, bytes saved for backward, the loss."""
    module.zero_grad(set_to_none=True)
    counter = SavedTensorCounter({p.untyped_storage().data_ptr() for p in module.parameters()})
    start = time.perf_counter()
    with counter.hooks():
        loss = module.compute_loss(batch)
    loss.backward()
    return time.perf_counter() - start, counter.nbytes, float(loss)


def run(rounds: int) -> dict[str, Any]:
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQUENCE), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    built = {row: build(row) for row in ROWS}
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    saved: dict[str, int] = {}
    losses: dict[str, float] = {}
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for row, (module, _) in built.items():  # warm-up, and the gradients to compare
        _, saved[row], losses[row] = step(module, batch)
        grads[row] = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    for _ in range(rounds):
        for row, (module, _) in built.items():
            times[row].append(step(module, batch)[0])
    reference = "frozen"
    rows = []
    for row, (label, *_) in ROWS.items():
        common = grads[row].keys() & grads[reference].keys()
        difference = max((grads[row][n] - grads[reference][n]).abs().max().item() for n in common)
        rows.append(
            {
                "row": row,
                "label": label,
                "saved_bytes": saved[row],
                "step_s": statistics.median(times[row]),
                "loss": losses[row],
                "trained_parameters": len(grads[row]),
                "max_grad_difference_vs_frozen": difference,
                "calls_without_graph": None if built[row][1] is None else built[row][1].calls_without_graph,
            }
        )
    return {
        "env": environment(packages=("transformers",)),
        "config": CONFIG,
        "trained_blocks": list(TRAINED),
        "batch": [BATCH, SEQUENCE],
        "rounds": rounds,
        "rows": rows,
    }


def render(results: dict[str, Any]) -> str:
    env = results["env"]
    config = results["config"]
    lines = [
        "# LISA: the frozen prefix (CPU)",
        "",
        f"Llama-style, {config['num_hidden_layers']} blocks, hidden {config['hidden_size']}, vocabulary"
        f" {config['vocab_size']}; batch {results['batch'][0]} x {results['batch'][1]} tokens; blocks"
        f" {results['trained_blocks']} train (and the final norm and head). One forward + backward; median of"
        f" {results['rounds']} rounds. {env['device']}, {env['torch_threads']} torch thread(s), load average"
        f" {env.get('load_average_1min')}, torch {env['torch']}, transformers {env.get('transformers')},"
        f" {env['date']}. `python -m benchmarks.lisa_frozen_prefix`",
        "",
        "| run | saved for backward (MiB) | step (ms) | loss | max grad difference vs frozen |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['label']} | {row['saved_bytes'] / 2**20:.1f} | {row['step_s'] * 1e3:.0f} | {row['loss']:.4f}"
            f" | {row['max_grad_difference_vs_frozen']:.1e} |"
        )
    lines += [
        "",
        "The gradient difference is over the parameters both runs train (with the embeddings always trained, the"
        " blocks' gradients are the same and the token table's are extra). Freezing the embeddings is what takes the"
        " frozen blocks out of the graph; the no-grad prefix keeps them out where the embedding output is marked as"
        " requiring grad (transformers' activation checkpointing does this), with the same loss and gradients.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args.rounds)
    write_results(Path(args.out_dir), "lisa_frozen_prefix_cpu", results, render)
    print(render(results))


if __name__ == "__main__":
    main()
