"""What early pruning reports after the cut: the per-layer summary, its printed form and the plot of the masks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_peft._plotting import save_figure
from lightning_peft.adapters import adapter_modules
from lightning_peft.layout.peft_layers import lora_ranks
from lightning_peft.pruning.masks import PruningMasks
from lightning_peft.pruning.plan import PruningPlan
from lightning_peft.pruning.surgery import find_lora_layers

__all__ = ["format_check", "format_summary", "mask_figure", "mask_values", "peft_sizes", "save_mask_plot", "summarize"]


def mask_values(masks: PruningMasks | None) -> dict[str, list]:
    """``{"heads": [(site path, block index, values)], "neurons": [...]}`` of the masks, detached on the CPU."""
    if masks is None:
        return {"heads": [], "neurons": []}
    return {
        kind: [(s.path, s.block, m.detach().float().cpu()) for s, m in zip(sites, values, strict=True)]
        for kind, sites, values in (
            ("heads", masks.attention_sites, masks.heads),
            ("neurons", masks.mlp_sites, masks.neurons),
        )
    }


def peft_sizes(root: nn.Module) -> dict[str, dict[str, int]]:
    """``{path: {adapter: size}}``: every LoRA adapter's rank and every adapter's bottleneck (as ``"adapter"``)."""
    sizes = {path: lora_ranks(layer) for path, layer in find_lora_layers(root).items()}
    return sizes | {path: {"adapter": adapter.down.out_features} for path, adapter in adapter_modules(root)}


def summarize(
    plan: PruningPlan,
    values: dict[str, list],
    peft_before: dict[str, dict[str, int]],
    params_before: int,
    params_after: int,
) -> dict[str, Any]:
    """Per site what ``plan`` keeps of what there was: heads and neurons (``layers``), LoRA ranks and adapters."""
    layers = []
    for kind, kept_by_site in (("heads", plan.heads), ("neurons", plan.neurons)):
        for path, _, mask in values[kind]:
            kept = len(kept_by_site.get(path, mask))  # a site left whole (not verified) keeps everything
            layers.append({"site": path, "kind": kind, "kept": kept, "total": len(mask)})
    lora = []
    for path, ranks in peft_before.items():
        for adapter, r in ranks.items():
            if path in plan.lora_removed or path in plan.adapters_removed:
                kept = 0
            elif adapter == "adapter" and path in plan.adapter_units:
                kept = len(plan.adapter_units[path])
            else:
                kept = len(plan.lora_ranks.get(path, {}).get(adapter, range(r)))
            lora.append({"site": path, "adapter": adapter, "kept": kept, "total": r})
    return {"layers": layers, "lora": lora, "params_before": params_before, "params_after": params_after}


def format_check(check: dict[str, Any]) -> list[str]:
    """The loss check's report as lines of text (none when there was no check)."""
    if not check.get("enabled"):
        return [f"  loss check: {check.get('reason', 'off')}"] if check else []
    used = ", ".join(f"{n} {v:.3g}" for n, v in check["used"].items())
    lines = [
        f"  loss check on {check['batches']} batch(es): {check['loss_before']:.4f} before, "
        f"{check['loss_after_cut']:.4f} after the cut ({check['increase']:+.1%}, tolerance"
        f" {check['tolerance']:.1%}); ratios used: {used}"
    ]
    lines += [f"  spared {line}" for line in check["spared"]]
    if check["increase"] > check["tolerance"]:
        lines.append("  nothing left to spare: the remaining loss change is the masks returning to 1")
    return lines


def format_summary(summary: dict[str, Any], check: dict[str, Any], step: int | None, score: str) -> str:
    """The printed summary: parameters before / after, the loss check, what each site and PEFT module kept."""
    s = summary
    lines = [
        f"EarlyPruning at step {step}: {s['params_before']:,} -> {s['params_after']:,} parameters"
        f" ({s['params_after'] / max(s['params_before'], 1):.1%}), heads and neurons ranked by {score}"
    ]
    lines += format_check(check)
    lines += [f"  {row['site']}: {row['kind']} {row['kept']}/{row['total']}" for row in s["layers"]]
    lines += [f"  {row['site']} [{row['adapter']}]: rank {row['kept']}/{row['total']}" for row in s["lora"]]
    return "\n".join(lines)


def mask_figure(
    values: dict[str, list], plan: PruningPlan, check: dict[str, Any], step: int | None, score: str, seed: int = 0
) -> Any:
    """A matplotlib ``Figure`` of the mask values per layer: heads left, neurons right; kept in blue, pruned in red.

    Each layer's values are spread horizontally around its position by a jitter drawn from a private generator
    seeded with ``seed``, so drawing the figure never touches the global random state (the run is the same with
    and without the plot). Each axes holds, per layer, one scatter of the kept and one of the pruned values.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    generator = torch.Generator().manual_seed(seed)
    if check.get("enabled"):
        fig.suptitle(
            f"loss {check['loss_before']:.4f} before, {check['loss_after_cut']:.4f} after the cut"
            f" ({check['increase']:+.1%}, tolerance {check['tolerance']:.0%}); ratios "
            + ", ".join(f"{n} {v:.2g}" for n, v in check["used"].items()),
            fontsize=9,
        )
    for ax, kind, kept_by_site in ((axes[0], "heads", plan.heads), (axes[1], "neurons", plan.neurons)):
        for position, (site, _, mask) in enumerate(values[kind]):
            kept = torch.zeros(len(mask), dtype=torch.bool)
            kept[kept_by_site.get(site, list(range(len(mask))))] = True
            x = position + (torch.rand(len(mask), generator=generator) - 0.5) * 0.5
            for chosen, color, label in ((kept, "tab:blue", "kept"), (~kept, "tab:red", "pruned")):
                ax.scatter(x[chosen], mask[chosen], s=6, color=color, label=None if position else label)
        ax.set_xlabel("layer")
        ax.set_ylabel("mask value")
        ax.set_title(f"{kind} masks at step {step} (ranked by {score})", fontsize=9)
        if values[kind]:
            ax.legend(loc="lower right")
    return fig


def save_mask_plot(path: str, *args: Any, **kwargs: Any) -> str:
    """Draw :func:`mask_figure` (same arguments after ``path``) and save it as a PNG at ``path``."""
    return save_figure(mask_figure(*args, **kwargs), path)
