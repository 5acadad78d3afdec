"""Memory, speed and gradient fidelity of activation quantization, per storage format.

For each model and each format (none, int8, fp8_e4m3, fp8_e5m2), on one fixed batch under bf16 autocast:

- bytes saved for backward: unique storage bytes autograd holds after the forward, without and with quantization
  (model parameters not counted; autocast's weight copies are where they are kept, and are reported apart),
  from the quantizer's pack-hook statistics; the first format is measured once more with
  ``recompute_weight_copies=False`` (autocast's weight copies kept until backward, instead of cast again there);
- step time (forward + backward; configurations interleaved, fastest and median of the timed steps) and its
  ratio to the unquantized step;
- on GPU, peak memory of the step (``torch.cuda.max_memory_allocated``);
- gradient fidelity against the unquantized step on the same batch: per-parameter cosine similarity (min / mean)
  and relative error ``||g_q - g|| / ||g||`` (over all gradients, and the worst tensor).

    python -m benchmarks.activation_quantization --mode cpu   # small ViT and Llama, minutes on 2 cores
    python -m benchmarks.activation_quantization --mode gpu   # ViT-B/16 64x224^2 and a 1.1B Llama at 4x1024
    python -m benchmarks.activation_quantization --mode cpu --sizes widths   # the GPU models' widths on CPU
    python -m benchmarks.activation_quantization --mode cpu --sizes gpu --saved-only   # the GPU sizes' bytes

``--sizes`` picks the models apart from the device: ``small`` (the CPU default), ``widths`` (ViT-B/16 at 8 x 224^2;
the 1.1B Llama's widths with 2 of its 22 layers at 1 x 1024 tokens: step time and gradients at real matrix sizes
on a CPU), ``gpu`` (the GPU default: ViT-B/16 at 64 x 224^2, the whole 1.1B Llama at 4 x 1024 tokens) and
``tiny`` (tests). ``--saved-only`` runs one forward per format and reports the bytes only: what a CPU can measure
of the GPU sizes (a forward of the 1.1B model at 4 x 1024 tokens takes about 45 s and 16 GB of RAM there), since
what autograd saves does not depend on the device. ``--combination`` adds one counted step of LISA + int8
activations + AdamW8bit against full fine-tuning (see :func:`_combination`).

Results go to ``benchmarks/results/activation_quantization_{mode}[_{sizes}][_saved].{json,md}`` (the sizes only
where they are not the mode's default).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lightning_peft.quantization import FORMATS, ActivationQuantizer

from .harness import RESULTS_DIR, cpu_name, storage_bytes, write_markdown, write_results

RESULTS = RESULTS_DIR
# LISA + int8 activations + AdamW8bit: at most this fraction of full fine-tuning's memory (the 1.1B Llama's target)
COMBINATION_TARGET = 0.45


@dataclass
class Workload:
    name: str
    description: str
    model: nn.Module
    batch: dict
    loss: Callable[[nn.Module, dict], torch.Tensor]


def _vit(sizes: str, device: torch.device) -> Workload:
    import timm

    torch.manual_seed(0)
    if sizes in ("gpu", "widths"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        batch_size, size = (64, 224) if sizes == "gpu" else (8, 224)
        description = f"timm ViT-B/16, batch {batch_size} x 224^2"
    elif sizes == "small":
        model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, patch_size=8, depth=4)
        batch_size, size, description = 32, 64, "timm ViT-S/8 (4 blocks), batch 32 x 64^2"
    else:
        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2
        )
        batch_size, size, description = 4, 32, "timm ViT, width 64, 2 blocks, batch 4 x 32^2"
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    labels = torch.randint(0, model.num_classes, (batch_size,), generator=generator)
    batch = {"images": images.to(device), "labels": labels.to(device)}

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch["images"]), batch["labels"])

    return Workload("vit", description, model.to(device), batch, loss)


# the TinyLlama-1.1B shape; `widths`: 2 of its 22 layers, so that a CPU steps it in seconds
_TINYLLAMA = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)
# sizes -> (LlamaConfig arguments, batch size, tokens per sequence, description)
_LLAMAS = {
    "gpu": (_TINYLLAMA, 4, 1024, "Llama 1.1B (TinyLlama shape), 4 x 1024 tokens"),
    "widths": ({**_TINYLLAMA, "num_hidden_layers": 2}, 1, 1024, "Llama 1.1B widths, 2 of 22 layers, 1 x 1024 tokens"),
    "small": (
        dict(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=512,
        ),
        4,
        256,
        "Llama 4 x 256 hidden, 4 layers (random weights), 4 x 256 tokens",
    ),
    "tiny": (
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        ),
        2,
        32,
        "Llama, hidden 64, 2 layers, 2 x 32 tokens",
    ),
}


def _llama(sizes: str, device: torch.device) -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM

    arguments, batch_size, seq_len, description = _LLAMAS[sizes]
    config = LlamaConfig(**arguments)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator).to(device)

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        return model(input_ids=batch["tokens"], labels=batch["tokens"]).loss

    return Workload("llama", description, model, {"tokens": tokens}, loss)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(
    workload: Workload, model: nn.Module, quantizer: ActivationQuantizer | None, device: torch.device, backward=True
):
    """One forward + backward (or forward only); returns the quantizer's statistics (or None)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        if quantizer is None:
            loss = workload.loss(model, workload.batch)
            stats = None
        else:
            with quantizer.step() as stats:
                loss = workload.loss(model, workload.batch)
    if backward:
        loss.backward()
    return stats


def _gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    # on the host: a 1.1B model's gradients would otherwise sit in GPU memory during the timed steps
    return {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}


def _fidelity(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    cosines, errors = [], []
    diff_sq = ref_sq = 0.0
    for name, grad in reference.items():
        # in float64: fp32 sums over a 65M-element embedding gradient are off by ~1e-4, and cosines came out > 1
        grad, mine = grad.double().flatten(), other[name].double().flatten()
        norm = grad.norm().item()
        if norm == 0.0:
            continue
        delta = (mine - grad).norm().item()
        cosines.append((grad @ mine).item() / (norm * mine.norm().item()) if mine.norm().item() else 0.0)
        errors.append(delta / norm)
        diff_sq += delta**2
        ref_sq += norm**2
    return {
        "grad_cosine_min": min(cosines),
        "grad_cosine_mean": statistics.fmean(cosines),
        "grad_rel_error": math.sqrt(diff_sq / ref_sq),
        "grad_rel_error_max": max(errors),
        "grad_tensors": len(cosines),
    }


def _quantizers(args) -> dict[str, ActivationQuantizer | None]:
    configs: dict[str, ActivationQuantizer | None] = {"none": None}
    for format in args.formats:
        for compiled in (False, True) if args.compile else (False,):
            configs[format + (" compiled" if compiled else "")] = ActivationQuantizer(
                format, group_size=args.group_size, min_numel=args.min_numel, compile=compiled
            )
    # the first format once more without recasting autocast's weight copies (kept from forward to backward)
    format = args.formats[0]
    configs[f"{format}{' compiled' if args.compile else ''}, weight copies kept"] = ActivationQuantizer(
        format,
        group_size=args.group_size,
        min_numel=args.min_numel,
        compile=args.compile,
        recompute_weight_copies=False,
    )
    return configs


def _combination(workload: Workload, model: nn.Module, args, plain_saved: int) -> dict:
    """Counted memory of one step of LISA + int8 activations + AdamW8bit against full fine-tuning with AdamW.

    Memory as ``benchmarks/memory.py`` counts it on CPU: parameters + gradients + optimizer state + bytes saved
    for backward. LISA's step trains the parameters outside the blocks (embeddings, final norm, head) and
    ``lisa_layers`` blocks; its saved bytes are measured by a forward with that trainable set and the int8
    quantizer, its AdamW8bit state by a real step of bitsandbytes' optimizer over the trained parameters (zero
    gradients: the state's size does not depend on them). Full fine-tuning's saved bytes are the unquantized
    forward's (``plain_saved``); its gradients and ``torch.optim.AdamW`` state (``exp_avg``, ``exp_avg_sq``) are
    one and two fp32 copies of the parameters, counted rather than allocated: with them a 1.1B model's step needs
    more memory than a 24 GiB machine has.
    """
    import bitsandbytes as bnb

    from lightning_peft.layout import find_blocks

    stack = find_blocks(model)
    chosen = [len(stack) * (i + 1) // (args.lisa_layers + 1) for i in range(args.lisa_layers)]
    trained = set(stack.outside_parameter_names())
    for index in chosen:
        trained |= set(stack.block_parameter_names(index))
    params = dict(model.named_parameters())
    for name, param in params.items():
        param.requires_grad_(name in trained)
    quantizer = ActivationQuantizer("int8", group_size=args.group_size, min_numel=args.min_numel)
    quantizer.attach(model)
    stats = _step(workload, model, quantizer, next(model.parameters()).device, backward=False)
    trainable = [params[name] for name in params if name in trained]
    for param in trainable:
        param.grad = torch.zeros_like(param)
    optimizer = bnb.optim.AdamW8bit(trainable, lr=1e-4, min_8bit_size=4096)
    optimizer.step()
    state = [v for per_param in optimizer.state.values() for v in per_param.values() if isinstance(v, torch.Tensor)]
    param_bytes = storage_bytes(params.values())
    lisa = {
        "params": param_bytes,
        "grads": storage_bytes(p.grad for p in trainable),
        "optimizer_state": storage_bytes(state),
        "saved": stats.bytes_after,
    }
    full = {"params": param_bytes, "grads": param_bytes, "optimizer_state": 2 * param_bytes, "saved": plain_saved}
    del optimizer, state
    for param in params.values():
        param.grad = None
        param.requires_grad_(True)
    ratio = sum(lisa.values()) / sum(full.values())
    print(f"combination: LISA + int8 + AdamW8bit x{ratio:.3f} of full fine-tuning (counted)", flush=True)
    return {
        "lisa_blocks": chosen,
        "blocks": len(stack),
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in params.values()),
        "lisa_int8_adamw8bit": lisa,
        "full_adamw": full,
        "ratio": ratio,
        "target": COMBINATION_TARGET,
    }


def run(args) -> dict:
    device = torch.device("cuda" if args.mode == "gpu" else "cpu")
    if args.mode == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--mode gpu needs a CUDA device")
    report = {
        "mode": args.mode,
        "sizes": args.sizes,
        "saved_only": args.saved_only,
        "combination": args.combination,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "autocast": "bfloat16",
        "group_size": args.group_size,
        "min_numel": args.min_numel,
        "compile": args.compile,
        "timed_steps": 0 if args.saved_only else args.steps,
        "models": {},
    }
    builders = {"vit": _vit, "llama": _llama}
    for name in args.models:
        workload = builders[name](args.sizes, device)
        model = workload.model
        # no optimizer step: every configuration sees the same weights and the same batch
        configs = _quantizers(args)
        rows, reference = {}, None
        for key, quantizer in configs.items():
            # the unquantized run counts its bytes with a quantizer that keeps every tensor
            counter = quantizer or ActivationQuantizer(min_numel=1 << 62, recompute_weight_copies=False)
            counter.attach(model)
            started = time.perf_counter()
            stats = _step(workload, model, counter, device, backward=not args.saved_only)
            rows[key] = {
                "format": "none (bf16 autocast)" if quantizer is None else key,
                "saved_bytes_before": stats.bytes_before,
                "saved_bytes_after": stats.bytes_after,
                "saved_weight_copies": stats.bytes_weight_copies,
                "tensors_saved": stats.num_saved,
                "tensors_quantized": stats.num_quantized,
                "tensors_deduplicated": stats.num_deduplicated,
                "tensors_recomputed": stats.num_recomputed,
            }
            if args.saved_only:
                rows[key]["forward_s"] = time.perf_counter() - started
                print(f"{name:6s} {key:18s} saved {stats.bytes_after / 2**20:,.1f} MiB", flush=True)
                continue
            if quantizer is None:
                reference = _gradients(model)
            else:
                rows[key].update(_fidelity(reference, _gradients(model)))
            for _ in range(args.warmup):
                _step(workload, model, quantizer, device)
        # timed steps interleave the configurations, so that drifting load on the machine affects all alike
        times: dict[str, list[float]] = {key: [] for key in configs}
        peaks: dict[str, int] = {}
        for _ in range(0 if args.saved_only else args.steps):
            for key, quantizer in configs.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                _synchronize(device)
                start = time.perf_counter()
                _step(workload, model, quantizer, device)
                _synchronize(device)
                times[key].append(time.perf_counter() - start)
                if device.type == "cuda":
                    peaks[key] = max(peaks.get(key, 0), torch.cuda.max_memory_allocated(device))
        baseline = rows["none"]
        for key in configs:
            row = rows[key]
            row["saved_ratio_vs_unquantized"] = row["saved_bytes_after"] / baseline["saved_bytes_after"]
            # what the quantizer does to the activations: the saved bytes other than weight copies
            activations = baseline["saved_bytes_after"] - baseline["saved_weight_copies"]
            row["activation_ratio"] = (row["saved_bytes_after"] - row["saved_weight_copies"]) / activations
            if args.saved_only:
                continue
            row["step_ms_median"] = 1000 * statistics.median(times[key])
            row["step_ms_min"] = 1000 * min(times[key])
            row["step_ms_all"] = [round(1000 * t, 2) for t in times[key]]
            # best-of-N: on a shared machine the minimum is the least disturbed measurement
            row["step_time_ratio"] = row["step_ms_min"] / baseline["step_ms_min"]
            row["peak_bytes"] = peaks.get(key)
            if peaks:
                row["peak_ratio"] = peaks[key] / peaks["none"]
            if key != "none":
                print(
                    f"{name:6s} {key:18s} saved x{row['saved_ratio_vs_unquantized']:.3f} "
                    f"time x{row['step_time_ratio']:.2f} cos_min {row['grad_cosine_min']:.4f}",
                    flush=True,
                )
        report["models"][name] = {"description": workload.description, "results": list(rows.values())}
        if args.combination:
            report["models"][name]["combination"] = _combination(workload, model, args, baseline["saved_bytes_after"])
        del workload, model, reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def _mib(value) -> str:
    return "–" if value is None else f"{value / 2**20:,.1f}"


def _command(report: dict) -> str:
    command = f"python -m benchmarks.activation_quantization --mode {report['mode']}"
    if report["sizes"] != DEFAULT_SIZES[report["mode"]]:
        command += f" --sizes {report['sizes']}"
    if report["saved_only"]:
        command += " --saved-only"
    if report.get("combination"):
        command += " --combination"
    if report["compile"]:
        command += " --compile"
    return command


def markdown(report: dict) -> str:
    saved_only = report["saved_only"]
    kernels = "eager" + (" and torch.compile-fused (`compiled`)" if report["compile"] else "")
    if saved_only:
        schedule = "one forward per configuration (bytes only: no backward, no timing)"
    else:
        schedule = (
            f"{kernels} quantization kernels, {report['timed_steps']} timed forward+backward steps per configuration,"
            " interleaved; time × compares the fastest step of each (least disturbed by other load)"
        )
    lines = [
        f"# Activation quantization — {report['mode'].upper()} mode, `{report['sizes']}` sizes",
        "",
        f"Device: {report['device']} ({report['cpu_threads']} CPU threads), torch {report['torch']}, "
        f"bf16 autocast, group size {report['group_size']}, min_numel {report['min_numel']}, {schedule}. "
        f"Generated by `{_command(report)}`.",
        "",
        "Saved = unique storage bytes held for backward after the forward (parameters not counted, autocast's"
        " bf16 copies of the weights counted where they are held: plain autograd and `weight copies kept` hold"
        " them, the default casts the weights again in backward — the recast column counts those saves)."
        " Activations × = the saved bytes other than weight copies, against the unquantized run's."
        + ("" if saved_only else " Gradient columns compare with the unquantized step on the same batch."),
        "",
    ]
    if report["mode"] == "cpu" and not saved_only:
        lines += [
            "CPU step-time ratios say little about a GPU: the pack / unpack work is memory traffic, which costs"
            " relatively more next to fast GPU matmuls; the GPU target (≤ 1.15×) needs `--mode gpu`.",
            "",
        ]
    if saved_only:
        lines += [
            "What autograd saves does not depend on the device (up to the attention kernel: both CPU and GPU"
            " run a flash-style kernel here), so these bytes are those of the same models on a GPU.",
            "",
        ]
    for entry in report["models"].values():
        lines += [f"## {entry['description']}", ""]
        if saved_only:
            lines += [
                "| format | saved MiB | saved × | weight copies MiB | activations × |"
                " tensors (quantized / dedup. / recast) |"
                " forward s |",
                "|---|---|---|---|---|---|---|",
            ]
        else:
            lines += [
                "| format | saved MiB | saved × | weight copies MiB | activations × |"
                " tensors (quantized / dedup. / recast) |"
                " step ms (min / median) | time × | peak MiB (×) | grad cos min | grad cos mean | rel. error |"
                " worst rel. error |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
        for row in entry["results"]:
            cells = [
                row["format"],
                _mib(row["saved_bytes_after"]),
                f"{row['saved_ratio_vs_unquantized']:.3f}",
                _mib(row["saved_weight_copies"]),
                f"{row['activation_ratio']:.3f}",
                f"{row['tensors_saved']} ({row['tensors_quantized']} / {row['tensors_deduplicated']}"
                f" / {row['tensors_recomputed']})",
            ]
            if saved_only:
                cells.append(f"{row['forward_s']:.1f}")
            else:
                peak = _mib(row["peak_bytes"])
                if row["peak_bytes"]:
                    peak += f" ({row['peak_ratio']:.2f})"
                cells += [
                    f"{row['step_ms_min']:.1f} / {row['step_ms_median']:.1f}",
                    f"{row['step_time_ratio']:.2f}",
                    peak,
                    f"{row.get('grad_cosine_min', 1.0):.4f}",
                    f"{row.get('grad_cosine_mean', 1.0):.4f}",
                    f"{row.get('grad_rel_error', 0.0):.4f}",
                    f"{row.get('grad_rel_error_max', 0.0):.4f}",
                ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if "combination" in entry:
            lines += _combination_markdown(entry["combination"])
    return "\n".join(lines)


def _combination_markdown(combo: dict) -> list[str]:
    lisa, full = combo["lisa_int8_adamw8bit"], combo["full_adamw"]
    met = "met" if combo["ratio"] <= combo["target"] else "NOT met"
    lines = [
        f"LISA ({len(combo['lisa_blocks'])} of {combo['blocks']} blocks: {combo['lisa_blocks']}, plus everything"
        f" outside the blocks; {combo['trainable_params'] / 1e6:,.1f} M of {combo['total_params'] / 1e6:,.1f} M"
        " parameters) + int8 activations + bitsandbytes AdamW8bit, against full fine-tuning with AdamW, one step,"
        " counted (MiB; full fine-tuning's gradients and AdamW state counted as one and two fp32 copies of the"
        " parameters, LISA's measured):",
        "",
        "| | params | grads | optimizer state | saved for backward | total | × full FT |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, parts in (("Full FT (AdamW)", full), ("LISA + int8 + AdamW8bit", lisa)):
        total = sum(parts.values())
        lines.append(
            f"| {label} | {_mib(parts['params'])} | {_mib(parts['grads'])} | {_mib(parts['optimizer_state'])}"
            f" | {_mib(parts['saved'])} | {_mib(total)} | {total / sum(full.values()):.3f} |"
        )
    lines += ["", f"Target: ≤ {combo['target']}× full fine-tuning: {combo['ratio']:.3f}× → **{met}**.", ""]
    return lines


def plot(report: dict, path: Path) -> Path:
    """Bar charts of ``report``: per model, the bytes saved for backward by configuration (weight copies apart)
    and, with ``--combination``, the counted memory of full fine-tuning against LISA + int8 + AdamW8bit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = list(report["models"].values())
    combined = any("combination" in entry for entry in entries)
    fig, axes = plt.subplots(
        len(entries), 2 if combined else 1, figsize=(13 if combined else 7, 3.2 * len(entries)), squeeze=False
    )
    gib = 2**30
    for row, entry in enumerate(entries):
        ax = axes[row][0]
        results = entry["results"]
        labels = [r["format"] for r in results]
        copies = [r["saved_weight_copies"] / gib for r in results]
        others = [(r["saved_bytes_after"] - r["saved_weight_copies"]) / gib for r in results]
        ax.barh(labels, others, color="tab:blue", label="activations (8-bit data and scales where quantized)")
        ax.barh(labels, copies, left=others, color="tab:orange", label="autocast's weight copies (kept)")
        for y, result in enumerate(results):
            ax.text(result["saved_bytes_after"] / gib, y, f" {result['saved_ratio_vs_unquantized']:.2f}x", va="center")
        ax.invert_yaxis()
        ax.set(xlabel="GiB saved for backward", title=entry["description"])
        ax.set_xlim(0, 1.15 * max(r["saved_bytes_after"] for r in results) / gib)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize="small", frameon=False)
        if not combined:
            continue
        ax = axes[row][1]
        combo = entry.get("combination")
        if combo is None:
            ax.axis("off")
            continue
        parts = ("params", "grads", "optimizer_state", "saved")
        colors = ("tab:gray", "tab:green", "tab:purple", "tab:blue")
        bars = {"full FT (AdamW)": combo["full_adamw"], "LISA + int8 + AdamW8bit": combo["lisa_int8_adamw8bit"]}
        left = [0.0] * len(bars)
        for part, color in zip(parts, colors, strict=True):
            widths = [counted[part] / gib for counted in bars.values()]
            ax.barh(list(bars), widths, left=left, color=color, label=part.replace("_", " "))
            left = [a + b for a, b in zip(left, widths, strict=True)]
        ax.text(left[1], 1, f" {combo['ratio']:.2f}x", va="center")
        ax.invert_yaxis()
        ax.set(xlabel="GiB, one step, counted", title=f"memory, target <= {combo['target']}x full FT")
        ax.set_xlim(0, 1.12 * left[0])
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=4, fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


DEFAULT_SIZES = {"cpu": "small", "gpu": "gpu"}


def output_stem(mode: str, sizes: str, saved_only: bool) -> str:
    stem = f"activation_quantization_{mode}"
    if sizes != DEFAULT_SIZES[mode]:
        stem += f"_{sizes}"
    return stem + ("_saved" if saved_only else "")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument(
        "--sizes",
        choices=["tiny", "small", "widths", "gpu"],
        default=None,
        help="the models (default: small on CPU, gpu on GPU)",
    )
    parser.add_argument("--models", nargs="+", choices=["vit", "llama"], default=["vit", "llama"])
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--min-numel", type=int, default=1 << 16)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 on CPU, 20 on GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 1 on CPU, 3 on GPU)")
    parser.add_argument(
        "--compile", action="store_true", help="also measure each format with torch.compile-fused kernels"
    )
    parser.add_argument(
        "--saved-only", action="store_true", help="one forward per format: saved bytes only (no backward, no timing)"
    )
    parser.add_argument(
        "--combination",
        action="store_true",
        help="also count one step of LISA + int8 activations + AdamW8bit against full fine-tuning (needs bitsandbytes)",
    )
    parser.add_argument("--lisa-layers", type=int, default=2, help="blocks LISA trains in --combination (default 2)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--render", type=Path, default=None, help="rewrite the markdown and chart of a results JSON, measuring nothing"
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text())
        write_markdown(args.render.with_suffix(".md"), markdown(report))
        print(f"wrote {plot(report, args.render.with_suffix('.png'))}")
        return report
    args.sizes = args.sizes or DEFAULT_SIZES[args.mode]
    args.steps = args.steps or (20 if args.mode == "gpu" else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.mode == "gpu" else 1)
    if args.saved_only and args.compile:
        parser.error("--compile measures step time, which --saved-only does not: leave one of them out")
    report = run(args)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / output_stem(args.mode, args.sizes, args.saved_only)
    write_results(args.output, stem.name, report, markdown)
    plot(report, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, {stem}.md and {stem}.png")
    return report


if __name__ == "__main__":
    main()
