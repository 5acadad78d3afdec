"""Memory, speed and gradient fidelity of activation quantization, per storage format.

For each model and each format (none, int8, fp8_e4m3, fp8_e5m2), on one fixed batch under bf16 autocast:

- bytes saved for backward: unique storage bytes autograd holds after the forward, without and with quantization
  (model parameters not counted; autocast's weight copies are), from the quantizer's pack-hook statistics;
- step time (forward + backward; configurations interleaved, fastest and median of the timed steps) and its
  ratio to the unquantized step;
- on GPU, peak memory of the step (``torch.cuda.max_memory_allocated``);
- gradient fidelity against the unquantized step on the same batch: per-parameter cosine similarity (min / mean)
  and relative error ``||g_q - g|| / ||g||`` (over all gradients, and the worst tensor).

    python benchmarks/activation_quantization.py --mode cpu   # small ViT and Llama, minutes on 2 cores
    python benchmarks/activation_quantization.py --mode gpu   # ViT-B/16 64x224^2 and a 1.1B Llama at 4x1024

Results go to ``benchmarks/results/activation_quantization_{mode}.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lightning_peft.quantization import FORMATS, ActivationQuantizer

RESULTS = Path(__file__).parent / "results"


@dataclass
class Workload:
    name: str
    description: str
    model: nn.Module
    batch: dict
    loss: Callable[[nn.Module, dict], torch.Tensor]


def _vit(mode: str, device: torch.device) -> Workload:
    import timm

    torch.manual_seed(0)
    if mode == "gpu":
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        batch_size, size, description = 64, 224, "timm ViT-B/16, batch 64 x 224^2"
    else:
        model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, patch_size=8, depth=4)
        batch_size, size, description = 32, 64, "timm ViT-S/8 (4 blocks), batch 32 x 64^2"
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    labels = torch.randint(0, model.num_classes, (batch_size,), generator=generator)
    batch = {"images": images.to(device), "labels": labels.to(device)}

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch["images"]), batch["labels"])

    return Workload("vit", description, model.to(device), batch, loss)


def _llama(mode: str, device: torch.device) -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM

    if mode == "gpu":
        # the TinyLlama-1.1B shape
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        )
        batch_size, seq_len, description = 4, 1024, "Llama 1.1B (TinyLlama shape), 4 x 1024 tokens"
    else:
        config = LlamaConfig(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=512,
        )
        batch_size, seq_len, description = 4, 256, "Llama 4 x 256 hidden, 4 layers (random weights), 4 x 256 tokens"
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


def _step(workload: Workload, model: nn.Module, quantizer: ActivationQuantizer | None, device: torch.device):
    """One forward + backward; returns the quantizer's statistics (or None)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        if quantizer is None:
            loss = workload.loss(model, workload.batch)
            stats = None
        else:
            with quantizer.step() as stats:
                loss = workload.loss(model, workload.batch)
    loss.backward()
    return stats


def _gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    # on the host: a 1.1B model's gradients would otherwise sit in GPU memory during the timed steps
    return {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}


def _fidelity(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    cosines, errors = [], []
    diff_sq = ref_sq = 0.0
    for name, grad in reference.items():
        norm = grad.norm().item()
        if norm == 0.0:
            continue
        delta = (other[name] - grad).norm().item()
        cosines.append(nn.functional.cosine_similarity(grad.flatten(), other[name].flatten(), dim=0).item())
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


def run(args) -> dict:
    device = torch.device("cuda" if args.mode == "gpu" else "cpu")
    if args.mode == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--mode gpu needs a CUDA device")
    report = {
        "mode": args.mode,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "autocast": "bfloat16",
        "group_size": args.group_size,
        "min_numel": args.min_numel,
        "compile": args.compile,
        "timed_steps": args.steps,
        "models": {},
    }
    builders = {"vit": _vit, "llama": _llama}
    for name in args.models:
        workload = builders[name](args.mode, device)
        model = workload.model
        # no optimizer step: every configuration sees the same weights and the same batch
        configs: dict[str, ActivationQuantizer | None] = {"none": None}
        for format in args.formats:
            for compiled in (False, True) if args.compile else (False,):
                configs[format + (" compiled" if compiled else "")] = ActivationQuantizer(
                    format, group_size=args.group_size, min_numel=args.min_numel, compile=compiled
                )
        rows, reference = {}, None
        for key, quantizer in configs.items():
            # the unquantized run counts its bytes with a quantizer that keeps every tensor
            counter = quantizer or ActivationQuantizer(min_numel=1 << 62)
            counter.attach(model)
            stats = _step(workload, model, counter, device)
            rows[key] = {
                "format": "none (bf16 autocast)" if quantizer is None else key,
                "saved_bytes_before": stats.bytes_before,
                "saved_bytes_after": stats.bytes_after,
                "tensors_saved": stats.num_saved,
                "tensors_quantized": stats.num_quantized,
                "tensors_deduplicated": stats.num_deduplicated,
            }
            if quantizer is None:
                reference = _gradients(model)
            else:
                rows[key].update(_fidelity(reference, _gradients(model)))
            for _ in range(args.warmup):
                _step(workload, model, quantizer, device)
        # timed steps interleave the configurations, so that drifting load on the machine affects all alike
        times: dict[str, list[float]] = {key: [] for key in configs}
        peaks: dict[str, int] = {}
        for _ in range(args.steps):
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
            row["step_ms_median"] = 1000 * statistics.median(times[key])
            row["step_ms_min"] = 1000 * min(times[key])
            row["step_ms_all"] = [round(1000 * t, 2) for t in times[key]]
            # best-of-N: on a shared machine the minimum is the least disturbed measurement
            row["step_time_ratio"] = row["step_ms_min"] / baseline["step_ms_min"]
            row["saved_ratio_vs_unquantized"] = row["saved_bytes_after"] / baseline["saved_bytes_after"]
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
        del workload, model, reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def _mib(value) -> str:
    return "–" if value is None else f"{value / 2**20:,.1f}"


def markdown(report: dict) -> str:
    lines = [
        f"# Activation quantization — {report['mode'].upper()} mode",
        "",
        f"Device: {report['device']} ({report['cpu_threads']} CPU threads), torch {report['torch']}, "
        f"bf16 autocast, group size {report['group_size']}, min_numel {report['min_numel']}, "
        f"eager{' and torch.compile-fused (`compiled`)' if report['compile'] else ''} quantization kernels, "
        f"{report['timed_steps']} timed forward+backward steps per configuration, interleaved; time × compares the"
        " fastest step of each (least disturbed by other load). Generated by "
        f"`python benchmarks/activation_quantization.py --mode {report['mode']}"
        f"{' --compile' if report['compile'] else ''}`.",
        "",
        "Saved = unique storage bytes held for backward after the forward (parameters not counted, autocast's"
        " weight copies counted). Gradient columns compare with the unquantized step on the same batch.",
        "",
    ]
    if report["mode"] == "cpu":
        lines += [
            "CPU step-time ratios say little about a GPU: the pack / unpack work is memory traffic, which costs"
            " relatively more next to fast GPU matmuls; the GPU target (≤ 1.15×) needs `--mode gpu`.",
            "",
        ]
    for entry in report["models"].values():
        lines += [
            f"## {entry['description']}",
            "",
            "| format | saved MiB | saved × | tensors (quantized / dedup.) | step ms (min / median) | time × |"
            " peak MiB (×) | grad cos min | grad cos mean | rel. error | worst rel. error |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in entry["results"]:
            peak = _mib(row["peak_bytes"])
            if row["peak_bytes"]:
                peak += f" ({row['peak_ratio']:.2f})"
            lines.append(
                f"| {row['format']} | {_mib(row['saved_bytes_after'])} | {row['saved_ratio_vs_unquantized']:.3f} "
                f"| {row['tensors_saved']} ({row['tensors_quantized']} / {row['tensors_deduplicated']}) "
                f"| {row['step_ms_min']:.1f} / {row['step_ms_median']:.1f} | {row['step_time_ratio']:.2f} | {peak} "
                f"| {row.get('grad_cosine_min', 1.0):.4f} | {row.get('grad_cosine_mean', 1.0):.4f} "
                f"| {row.get('grad_rel_error', 0.0):.4f} | {row.get('grad_rel_error_max', 0.0):.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--models", nargs="+", choices=["vit", "llama"], default=["vit", "llama"])
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--min-numel", type=int, default=1 << 16)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 on CPU, 20 on GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 1 on CPU, 3 on GPU)")
    parser.add_argument(
        "--compile", action="store_true", help="also measure each format with torch.compile-fused kernels"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.steps = args.steps or (20 if args.mode == "gpu" else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.mode == "gpu" else 1)
    report = run(args)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"activation_quantization_{args.mode}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
