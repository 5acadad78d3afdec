"""Speed and memory before / after early pruning, and accuracy of EarlyPruning + LoRA on the tweet task.

Three modes, each comparing side by side in one process:

* ``--mode cpu`` -- small timm ViT and Llama-style models (random weights, synthetic inputs), unpruned vs pruned with
  the defaults of :class:`~lightning_peft.callbacks.EarlyPruning` (1/3 of the heads per layer -- whole key/value
  groups for the Llama's grouped-query attention -- 1/3 of the MLP neurons, and for LoRA 3/4 of the LoRA layers
  removed, half the ranks of the rest). The pruned model is made by the same surgery the callback applies
  (:func:`~lightning_peft.pruning.apply_pruning_plan`), from a plan of random scores: speed depends on the shapes
  only, not on which heads go. Timed: a training step (forward, backward, AdamW step) with LoRA (r=16 on the
  attention and MLP Linears) and with full fine-tuning, and an inference forward. Variants alternate within each
  round, so machine noise affects both alike. Memory: parameters, and the bytes of the tensors saved for backward
  during one training forward (``saved_tensors_hooks``, parameters excluded).
* ``--mode gpu`` -- the same for ViT-B/16 at 64 x 224^2 (bf16 autocast) and a 1.1B Llama-style model (hidden 2048,
  22 layers, 32 heads, 4 KV heads, intermediate 5632, vocab 32000) at 4 x 1024 tokens with LoRA, on one CUDA GPU;
  memory is ``torch.cuda.max_memory_allocated()``.
* ``--mode tweets`` -- the real callback end to end: all-MiniLM-L6-v2 + LoRA on the tweet sentiment task
  (``TextClassifier`` + ``TweetSentiment``, 150 steps, batch 16, the same seed), plain LoRA vs LoRA +
  ``EarlyPruning(estimation_steps=50)`` with its defaults (Taylor ranking, loss check), the paper's recipe
  (magnitude ranking, fixed ratios), Taylor at fixed ratios, magnitude with the check (``TWEET_RUNS``):
  validation accuracy, the loss check's losses before / after the cut and the ratios it used, the training loss
  around the cut, LoRA parameters, step times. Results are written after every run.
* ``--mode tweets-speed`` -- adds to those results a training-step speed-up per pruned run, timing plain LoRA and
  the run's pruned shapes alternately on one batch (the runs' own step times suffer from a loaded machine).
* ``--mode tweets-scores`` -- one 50-step estimation, then the validation-loss increase of cutting 1/3 of the heads
  and / or neurons ranked by Taylor importance vs by mask magnitude.
* ``--mode causal`` -- a byte-level Llama (grouped-query attention) pretrained here on tweet texts (no pretrained
  causal LM ships in a package usable offline), fine-tuned with LoRA for 150 steps with and without EarlyPruning:
  perplexity right before and right after the cut, and at the end.

Run from the repository root::

    python -m benchmarks.pruning --mode cpu       # ~3 minutes on 2 cores
    python -m benchmarks.pruning --mode tweets    # ~30 minutes on 2 cores (5 runs)
    python -m benchmarks.pruning --mode tweets-speed   # ~5 minutes, after --mode tweets
    python -m benchmarks.pruning --mode tweets-scores  # ~4 minutes
    python -m benchmarks.pruning --mode causal    # ~20 minutes on a loaded 2-core machine
    python -m benchmarks.pruning --mode gpu       # one CUDA GPU, under 2 minutes

Results: ``benchmarks/results/pruning_<mode>.json`` (raw numbers) and ``.md`` (tables).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.pruning import (
    apply_pruning_plan,
    choose_heads,
    choose_lora,
    choose_neurons,
    find_lora_layers,
    find_sites,
)
from lightning_peft.pruning.plan import PruningPlan

from .harness import (
    RESULTS_DIR,
    SavedTensorCounter,
    cpu_name,
    environment,
    llama_config,
    quiet_cpu_trainer,
    write_json,
    write_markdown,
    write_results,
)

RESULTS = RESULTS_DIR

SIZES = {
    "cpu": {
        "vit": dict(embed_dim=384, depth=6, num_heads=6, img_size=64, patch_size=8, batch=8),
        "llama": dict(hidden=384, layers=6, heads=12, kv_heads=6, intermediate=1024, vocab=4096, batch=2, seq=128),
    },
    "tiny": {
        "vit": dict(embed_dim=48, depth=2, num_heads=6, img_size=32, patch_size=8, batch=2),
        "llama": dict(hidden=96, layers=2, heads=6, kv_heads=3, intermediate=128, vocab=128, batch=1, seq=16),
    },
    "gpu": {
        "vit": dict(embed_dim=768, depth=12, num_heads=12, img_size=224, patch_size=16, batch=64),
        "llama": dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000, batch=4, seq=1024),
    },
}
LORA_TARGETS = {
    "vit": ["qkv", "proj", "fc1", "fc2"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def build(family: str, size: dict[str, Any]) -> nn.Module:
    if family == "vit":
        import timm

        return timm.create_model(
            "vit_base_patch16_224",
            pretrained=False,
            num_classes=10,
            embed_dim=size["embed_dim"],
            depth=size["depth"],
            num_heads=size["num_heads"],
            img_size=size["img_size"],
            patch_size=size["patch_size"],
        )
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config(size, size["seq"]))


def make_batch(family: str, size: dict[str, Any], device: torch.device) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    if family == "vit":
        x = torch.randn(size["batch"], 3, size["img_size"], size["img_size"], generator=g)
        y = torch.randint(0, 10, (size["batch"],), generator=g)
    else:
        x = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=g)
        y = x
    return x.to(device), y.to(device)


def loss_of(family: str, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    if family == "vit":
        return nn.functional.cross_entropy(model(x), y)
    return model(input_ids=x, labels=y).loss


def add_lora(family: str, model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS[family]))


def prune(model: nn.Module, seed: int = 0) -> PruningPlan:
    """Apply EarlyPruning's default ratios to ``model`` with random scores (only the shapes matter for speed)."""
    g = torch.Generator().manual_seed(seed)
    sites = find_sites(model)
    heads = choose_heads({s.path: (torch.rand(s.num_heads, generator=g), s.group_size) for s in sites.attention}, 1 / 3)
    neurons = choose_neurons({s.path: torch.rand(s.hidden, generator=g) for s in sites.mlp}, 1 / 3)
    lora = find_lora_layers(model)
    removed, ranks = choose_lora(
        {p: float(torch.rand((), generator=g)) for p in lora},
        {p: {a: torch.rand(layer.r[a], generator=g) for a in layer.r} for p, layer in lora.items()},
        0.75,
        0.5,
    )
    plan = PruningPlan(heads=heads, neurons=neurons, lora_removed=removed, lora_ranks=ranks)
    apply_pruning_plan(model, plan)
    return plan


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(family: str, model: nn.Module, batch, device, mode: str, warmup: int, steps: int) -> dict[str, float]:
    """Median training-step and inference times (s) and memory of ``model``."""
    x, y = batch
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    result: dict[str, float] = {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in params),
    }
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    model.train()
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        with autocast:
            loss = loss_of(family, model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    result["train_step_s"] = statistics.median(times)
    if device.type == "cuda":
        result["train_peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = SavedTensorCounter(param_ptrs)
        with saved.hooks():
            loss = loss_of(family, model, x, y)
        result["saved_activation_bytes"] = saved.nbytes
        del loss
    del optimizer
    model.eval()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for i in range(warmup + steps):
            _sync(device)
            start = time.perf_counter()
            with autocast:
                loss_of(family, model, x, y)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    result["infer_s"] = statistics.median(times)
    if device.type == "cuda":
        result["infer_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


def run_speed(mode: str, rounds: int, warmup: int, steps: int, regimes: dict[str, list[str]]) -> dict[str, Any]:
    """Time unpruned vs pruned for each family and regime; ``mode`` names the sizes (``cpu``, ``tiny``, ``gpu``)."""
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    out: dict[str, Any] = {}
    for family, family_regimes in regimes.items():
        size = SIZES[mode][family]
        batch = make_batch(family, size, device)
        for regime in family_regimes:
            torch.manual_seed(0)
            with torch.device(device):  # random init of a 1.1B model is seconds on a GPU, a minute on a CPU
                base = build(family, size)
                if regime == "lora":
                    base = add_lora(family, base)
                pruned = copy.deepcopy(base)
                plan = prune(pruned)
            base.to("cpu"), pruned.to("cpu")  # one model at a time on the device, so peak memory is its own
            runs: dict[str, list[dict[str, float]]] = {"unpruned": [], "pruned": []}
            for r in range(rounds):
                order = ["unpruned", "pruned"] if r % 2 == 0 else ["pruned", "unpruned"]
                for variant in order:
                    model = (base if variant == "unpruned" else pruned).to(device)
                    runs[variant].append(measure(family, model, batch, device, mode, warmup, steps))
                    model.to("cpu")
            summary = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
            u, p = summary["unpruned"], summary["pruned"]
            summary["ratios"] = {
                "train_speedup": u["train_step_s"] / p["train_step_s"],
                "infer_speedup": u["infer_s"] / p["infer_s"],
                "params": p["params"] / u["params"],
                "trainable": p["trainable"] / u["trainable"],
            }
            for key in ("saved_activation_bytes", "train_peak_bytes", "infer_peak_bytes"):
                if key in u:
                    summary["ratios"][key] = p[key] / u[key]
            if regime == "lora":
                summary["ratios"]["lora_params"] = _lora_params(pruned) / _lora_params(base)
            summary["heads_kept"] = {k: len(v) for k, v in list(plan.heads.items())[:1]}
            summary["size"] = size
            out[f"{family}_{regime}"] = summary
            print(f"{family}/{regime}: {json.dumps(summary['ratios'])}", flush=True)
            del base, pruned
    return out


def _lora_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


TWEET_RUNS = {
    # name: EarlyPruning arguments (None: no pruning)
    "lora": None,
    "lora_early_pruning": {},  # the defaults: Taylor scores, loss check
    "paper_fixed": {"score": "magnitude", "max_loss_increase": None},  # the paper's recipe (the defaults before)
    "taylor_fixed": {"max_loss_increase": None},
    "magnitude_checked": {"score": "magnitude", "max_loss_increase": 0.05},
    "foundation_only": {"peft_module_ratio": 0.0, "peft_rank_ratio": 0.0},
    "peft_only": {"head_ratio": 0.0, "neuron_ratio": 0.0},
}
TWEET_LABELS = {
    "lora": "LoRA",
    "lora_early_pruning": "LoRA + EarlyPruning, defaults (Taylor scores, loss check)",
    "paper_fixed": "LoRA + EarlyPruning, paper recipe (magnitude, fixed ratios, no check)",
    "taylor_fixed": "LoRA + EarlyPruning, Taylor scores, fixed ratios (no check)",
    "magnitude_checked": "LoRA + EarlyPruning, magnitude scores, loss check 5 %",
    "foundation_only": "LoRA + EarlyPruning, heads and neurons only (PEFT ratios 0)",
    "peft_only": "LoRA + EarlyPruning, LoRA only (head and neuron ratios 0)",
}


def run_tweets(steps: int, estimation_steps: int, lr: float, runs: list[str], seed: int = 42) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from lightning_peft.callbacks import EarlyPruning
    from lightning_peft.data import TweetSentiment
    from lightning_peft.modules import TextClassifier

    class StepTimes(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.times.append(time.perf_counter() - self._start)
            self.losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))

    lora = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query", "key", "value", "dense"]}
    out: dict[str, Any] = {}
    for name in runs:
        pl.seed_everything(seed, verbose=False)
        module = TextClassifier(
            "sentence-transformers/all-MiniLM-L6-v2",
            num_labels=3,
            peft=lora,
            optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
        )
        data = TweetSentiment(
            tokenizer="sentence-transformers/all-MiniLM-L6-v2", max_length=48, batch_size=16, val_size=1000
        )
        timer = StepTimes()
        callbacks: list[Callback] = [timer]
        pruning = None
        if TWEET_RUNS[name] is not None:
            pruning = EarlyPruning(estimation_steps=estimation_steps, **TWEET_RUNS[name])
            callbacks.append(pruning)
        params_before, lora_before = sum(p.numel() for p in module.parameters()), _lora_params(module)
        with tempfile.TemporaryDirectory() as root:
            trainer = quiet_cpu_trainer(
                root, callbacks, max_epochs=1, limit_train_batches=steps, num_sanity_val_steps=0
            )
            start = time.perf_counter()
            trainer.fit(module, data)
            wall = time.perf_counter() - start
        row = {
            "val_acc": float(trainer.callback_metrics["val/acc"]),
            "wall_s": wall,
            "params_before": params_before,
            "params_after": sum(p.numel() for p in module.parameters()),
            "lora_params_before": lora_before,
            "lora_params_after": _lora_params(module),
            "median_step_s": statistics.median(timer.times[5:]),
        }
        if pruning is not None:
            cut = pruning.pruned_at
            row["median_step_before_pruning_s"] = statistics.median(timer.times[5:cut])
            row["median_step_after_pruning_s"] = statistics.median(timer.times[cut + 5 :])
            row["summary"] = pruning.summary
            row["check"] = pruning.check
            # training loss of the 5 steps right before the cut and the 5 right after (each batch seen once)
            row["train_loss_5_before_cut"] = statistics.mean(timer.losses[cut - 5 : cut])
            row["train_loss_5_after_cut"] = statistics.mean(timer.losses[cut : cut + 5])
        out[name] = row
        print(name, {k: v for k, v in row.items() if k != "summary"}, flush=True)
    return out


CAUSAL_RUNS = {
    # name: EarlyPruning arguments (None: no pruning)
    "lora": None,
    "lora_early_pruning": {},
    "paper_fixed": {"score": "magnitude", "max_loss_increase": None},
    "taylor_fixed": {"max_loss_increase": None},
}


def run_causal(pretrain_steps: int, steps: int, estimation_steps: int, lr: float, runs: list[str]) -> dict[str, Any]:
    """A Llama-style decoder (grouped-query attention) pretrained here on tweet text, then fine-tuned with LoRA.

    No pretrained causal LM ships in a package this project may use offline, so the "pretrained" model is made
    here: a byte-level Llama (``CAUSAL_LLAMA``) trained in full for ``pretrain_steps`` on one seeded draw of 12,000
    tweet texts; each run then fine-tunes it with LoRA r=8 on every projection for ``steps`` on another draw (the
    draws overlap), with or without EarlyPruning. Perplexity (per byte) on held-out texts: before fine-tuning, right
    before and right after the cut, and at the end. The model, data and perplexity are :mod:`benchmarks.causal_lm`'s.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from lightning_peft.callbacks import EarlyPruning
    from lightning_peft.modules import CausalLM

    from .causal_lm import CAUSAL_LORA, adamw, perplexity, prepare

    class Perplexity(Callback):
        def __init__(self, at: int, key: str, batches: list, out: dict) -> None:
            self.at, self.key, self.batches, self.out = at, key, batches, out

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == self.at and self.key not in self.out:
                self.out[self.key] = perplexity(pl_module, self.batches)

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as root:
        setup = prepare(root, pretrain_steps)
        folder, finetune_data, val = setup.folder, setup.data, setup.held_out
        out["pretraining"] = setup.pretraining
        print("pretrained", out["pretraining"], flush=True)
        for name in runs:
            pl.seed_everything(42, verbose=False)
            module = CausalLM(model=folder, peft=CAUSAL_LORA, optimizer=adamw(lr))
            measured: dict[str, float] = {}
            callbacks: list[Callback] = [Perplexity(estimation_steps, "ppl_before_cut", val, measured)]
            pruning = None
            if CAUSAL_RUNS[name] is not None:
                pruning = EarlyPruning(estimation_steps=estimation_steps, **CAUSAL_RUNS[name])
                callbacks.append(pruning)
            callbacks.append(Perplexity(estimation_steps, "ppl_after_cut", val, measured))
            params_before = sum(p.numel() for p in module.parameters())
            start = time.perf_counter()
            trainer = quiet_cpu_trainer(root, callbacks, max_steps=steps, num_sanity_val_steps=0, limit_val_batches=0)
            trainer.fit(module, finetune_data)
            row = {
                **measured,
                "final_ppl": perplexity(module, val),
                "wall_s": time.perf_counter() - start,
                "params_before": params_before,
                "params_after": sum(p.numel() for p in module.parameters()),
            }
            if pruning is not None:
                row["check"] = pruning.check
                row["summary"] = pruning.summary
            out[name] = row
            print(name, {k: v for k, v in row.items() if k != "summary"}, flush=True)
    return out


def _causal_markdown(results: dict[str, Any], env: dict[str, Any], args: argparse.Namespace) -> str:
    from .causal_lm import CAUSAL_LLAMA

    pre = results["pretraining"]
    lines = [
        "# Early pruning on a causal LM (byte-level Llama with grouped-query attention, pretrained here; CPU)",
        "",
        "No pretrained causal LM ships in a package this project can install offline (the package lists hold none),",
        f"so a byte-level Llama ({json.dumps({k: v for k, v in CAUSAL_LLAMA.items() if k != 'model_type'})}) is",
        f"pretrained here in full for {pre['steps']} steps (batch 8 x 128 bytes, AdamW lr 3e-3) on tweet texts,"
        f" then each run fine-tunes it with LoRA r=8 on every projection for {args.steps} steps (lr {args.lr}) on",
        f"another draw of tweet texts (the draws overlap); EarlyPruning(estimation_steps={args.estimation_steps})",
        "with the arguments of each row.",
        f"{env['date']}, torch {env['torch']}, {env['threads']} thread(s). Perplexity per byte on 16 held-out",
        f"batches; the pretrained model's is {pre['val_ppl']:.2f}.",
        "",
        "| run | ppl before the cut | ppl right after the cut | final ppl | check: loss before -> after cut |"
        " ratios used (heads, neurons, LoRA layers, LoRA ranks) | model params |",
        "|---|---:|---:|---:|---|---|---:|",
    ]
    labels = {
        "lora": "LoRA",
        "lora_early_pruning": "LoRA + EarlyPruning, defaults (Taylor scores, loss check)",
        "paper_fixed": "LoRA + EarlyPruning, paper recipe (magnitude, fixed ratios, no check)",
        "taylor_fixed": "LoRA + EarlyPruning, Taylor scores, fixed ratios (no check)",
    }
    for name, r in results.items():
        if name == "pretraining":
            continue
        check = r.get("check") or {}
        if check.get("enabled"):
            measured = (
                f"{check['loss_before']:.3f} -> {check['loss_after_cut']:.3f} ({check['increase']:+.1%}, tolerance"
                f" {check['tolerance']:.0%})"
            )
            used = ", ".join(f"{v:.3g}" for v in check["used"].values())
        else:
            measured, used = "-", "fixed" if name != "lora" else ""
        lines.append(
            f"| {labels.get(name, name)} | {r['ppl_before_cut']:.3f} | {r['ppl_after_cut']:.3f} |"
            f" {r['final_ppl']:.3f} | {measured} | {used} | {r['params_after']:,}"
            f" ({r['params_after'] / r['params_before']:.1%}) |"
        )
    return "\n".join([*lines, *_default_tolerance_note(results), ""])


def run_tweets_scores(estimation_steps: int, lr: float, val_batches: int = 16) -> dict[str, Any]:
    """How well each score ranks: the loss increase of cuts chosen by Taylor vs magnitude, on held-out batches.

    One estimation (the tweet recipe, ``estimation_steps``); at its end, before the cut, each score's plan at the
    paper's ratios -- heads alone, neurons alone, both -- is simulated (the masking the loss check uses) and the
    relative increase of the loss on ``val_batches`` validation batches recorded. A ranking that knows which units
    matter cuts less of the loss.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from lightning_peft.callbacks import EarlyPruning
    from lightning_peft.data import TweetSentiment
    from lightning_peft.modules import TextClassifier
    from lightning_peft.pruning.decision import evaluation, mean_loss, simulated_cut

    pl.seed_everything(42, verbose=False)
    lora = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query", "key", "value", "dense"]}
    module = TextClassifier(
        "sentence-transformers/all-MiniLM-L6-v2",
        num_labels=3,
        peft=lora,
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
    )
    data = TweetSentiment(
        tokenizer="sentence-transformers/all-MiniLM-L6-v2", max_length=48, batch_size=16, val_size=1000
    )
    pruning = EarlyPruning(estimation_steps=estimation_steps, max_loss_increase=None)
    out: dict[str, Any] = {}

    class Compare(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step != estimation_steps or out:
                return
            val = [b for _, b in zip(range(val_batches), trainer.datamodule.val_dataloader(), strict=False)]
            val = [trainer.strategy.batch_to_device(b) for b in val]
            cuts = {
                "heads": {"head_ratio": 1 / 3, "neuron_ratio": 0.0, "peft_module_ratio": 0.0, "peft_rank_ratio": 0.0},
                "neurons": {"head_ratio": 0.0, "neuron_ratio": 1 / 3, "peft_module_ratio": 0.0, "peft_rank_ratio": 0.0},
                "heads_and_neurons": {
                    "head_ratio": 1 / 3,
                    "neuron_ratio": 1 / 3,
                    "peft_module_ratio": 0.0,
                    "peft_rank_ratio": 0.0,
                },
            }
            with evaluation(trainer, pl_module):
                before = mean_loss(pl_module, val)
                out["val_loss_before"] = before
                out["mask_spread"] = pruning.masks.spread()
                for score in ("taylor", "magnitude"):
                    pruning.score = score
                    for cut, ratios in cuts.items():
                        with simulated_cut(pl_module, pruning.make_plan(ratios), pruning.masks):
                            out[f"{score}/{cut}"] = (mean_loss(pl_module, val) - before) / before
                pruning.score = "taylor"
            print(out, flush=True)
            trainer.should_stop = True

    with tempfile.TemporaryDirectory() as root:
        trainer = quiet_cpu_trainer(
            root, [Compare(), pruning], max_steps=estimation_steps + 1, num_sanity_val_steps=0, limit_val_batches=0
        )
        trainer.fit(module, data)
    return out


def plan_from_summary(summary: dict[str, Any]) -> PruningPlan:
    """A plan with the shapes a run's pruning summary reports (the first units kept: speed depends on shapes only)."""
    heads = {r["site"]: list(range(r["kept"])) for r in summary["layers"] if r["kind"] == "heads"}
    neurons = {r["site"]: list(range(r["kept"])) for r in summary["layers"] if r["kind"] == "neurons"}
    removed = sorted({r["site"] for r in summary["lora"] if r["kept"] == 0})
    ranks: dict[str, dict[str, list[int]]] = {}
    for r in summary["lora"]:
        if 0 < r["kept"] < r["total"]:
            ranks.setdefault(r["site"], {})[r["adapter"]] = list(range(r["kept"]))
    return PruningPlan(heads=heads, neurons=neurons, lora_removed=removed, lora_ranks=ranks)


def run_tweets_speed(results: dict[str, Any], lr: float, rounds: int = 3, warmup: int = 2, steps: int = 6) -> None:
    """Add ``speedup_alternated`` to every pruned tweet run: training steps of plain LoRA vs that run's shapes.

    The runs' own step times come from runs that shared a loaded machine; here the unpruned and the pruned model
    alternate within each round on the same batch (median of rounds of median steps), so load hits both alike.
    """
    import lightning.pytorch as pl

    from lightning_peft.data import TweetSentiment
    from lightning_peft.modules import TextClassifier

    lora = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query", "key", "value", "dense"]}

    def fresh() -> TextClassifier:
        pl.seed_everything(42, verbose=False)
        return TextClassifier("sentence-transformers/all-MiniLM-L6-v2", num_labels=3, peft=lora)

    data = TweetSentiment(
        tokenizer="sentence-transformers/all-MiniLM-L6-v2", max_length=48, batch_size=16, val_size=1000
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))

    def step_time(module: nn.Module) -> float:
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
        module.train()
        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            module.compute_loss(batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    unpruned = fresh()
    for name, row in results.items():
        if "summary" not in row:
            continue
        pruned = fresh()
        apply_pruning_plan(pruned, plan_from_summary(row["summary"]))
        pairs = []
        for r in range(rounds):
            order = [unpruned, pruned] if r % 2 == 0 else [pruned, unpruned]
            t = {id(m): step_time(m) for m in order}
            pairs.append((t[id(unpruned)], t[id(pruned)]))
        u, p = statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)
        row["speedup_alternated"] = {"unpruned_step_s": u, "pruned_step_s": p, "speedup": u / p}
        print(name, row["speedup_alternated"], flush=True)


def _env() -> dict[str, Any]:
    device = torch.device("cuda") if torch.cuda.is_available() else None
    env = environment(device, packages=("timm", "transformers", "peft"))
    # the keys this script's tables and committed results use
    env |= {"threads": env["torch_threads"], "machine": cpu_name()}
    if device is not None:
        env["gpu"] = env["device"]
    return env


def _speed_markdown(mode: str, results: dict[str, Any], env: dict[str, Any]) -> str:
    lines = [
        f"# Early pruning: speed and memory ({mode})",
        "",
        f"{env['date']}, torch {env['torch']}, {env.get('gpu', env['machine'])}, {env['threads']} thread(s).",
        "Unpruned vs pruned with EarlyPruning's defaults (1/3 of heads per layer, 1/3 of MLP neurons; LoRA: 3/4 of",
        "the layers removed, half the ranks of the rest); medians over rounds that alternate the two. Speed-up =",
        "unpruned time / pruned time. Target: >= 1.3x for training steps and inference.",
        "",
        "| model | regime | params (pruned/unpruned) | trainable | train step unpruned | pruned | speed-up |"
        " inference unpruned | pruned | speed-up | memory (pruned/unpruned) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, s in results.items():
        family, regime = key.split("_", 1)
        u, p, r = s["unpruned"], s["pruned"], s["ratios"]
        memory_key = "train_peak_bytes" if "train_peak_bytes" in r else "saved_activation_bytes"
        memory = f"{r[memory_key]:.2f} ({'peak' if memory_key == 'train_peak_bytes' else 'saved activations'})"
        lines.append(
            f"| {family} | {regime} | {u['params'] / 1e6:.1f} M -> {p['params'] / 1e6:.1f} M ({r['params']:.2f}) |"
            f" {r['trainable']:.2f} | {u['train_step_s'] * 1e3:.1f} ms | {p['train_step_s'] * 1e3:.1f} ms |"
            f" {r['train_speedup']:.2f}x | {u['infer_s'] * 1e3:.1f} ms | {p['infer_s'] * 1e3:.1f} ms |"
            f" {r['infer_speedup']:.2f}x | {memory} |"
        )
    lora_rows = [(k, s["ratios"]["lora_params"]) for k, s in results.items() if "lora_params" in s["ratios"]]
    if lora_rows:
        lines += ["", "LoRA parameters kept: " + ", ".join(f"{k} {v:.1%}" for k, v in lora_rows) + " (target <= 30 %)."]
    lines += ["", "Sizes: " + "; ".join(f"{k}: {json.dumps(s['size'])}" for k, s in results.items()), ""]
    return "\n".join(lines)


def _default_tolerance_note(results: dict[str, Any]) -> list[str]:
    """A note when the defaults row was measured with another ``max_loss_increase`` than today's default."""
    import inspect

    from lightning_peft.callbacks import EarlyPruning

    default = inspect.signature(EarlyPruning).parameters["max_loss_increase"].default
    check = (results.get("lora_early_pruning") or {}).get("check") or {}
    if not check.get("enabled") or check["tolerance"] == default:
        return []
    tries = [t["increase"] for t in check["tries"]]
    same = tries[-1] <= default and all(t > check["tolerance"] for t in tries[:-1])
    return [
        "",
        f"The defaults row ran with `max_loss_increase={check['tolerance']}`, the default then; today's default is"
        f" {default}: "
        + (
            f"every try before the last exceeded {check['tolerance']:.0%} and the last ({tries[-1]:+.1%}) is within"
            f" {default:.0%}, so the search stops at the same plan and the row is that of today's defaults."
            if same
            else "the search would continue further; the row is not that of today's defaults."
        ),
    ]


def _tweets_markdown(results: dict[str, Any], env: dict[str, Any], args: argparse.Namespace) -> str:
    base = results.get("lora")
    lines = [
        "# Early pruning on the tweet task (all-MiniLM-L6-v2 + LoRA, CPU)",
        "",
        f"{env['date']}, torch {env['torch']}, {env['threads']} thread(s), seed 42, {args.steps} steps of batch 16,"
        f" AdamW lr {args.lr}, LoRA r=8 on query/key/value/dense; EarlyPruning(estimation_steps="
        f"{args.estimation_steps}) with the arguments of each row. Loss before / after the cut: the loss check's"
        " measurement (the boundary batch and the 3 last estimation batches, eval mode; `-` where the check is off),"
        " then the mean training loss of the 5 steps before and after the cut. Speed-up kept: a training step of"
        " plain LoRA / one of the run's pruned shapes, timed alternately on one batch (`--mode tweets-speed`); in"
        " brackets, plain LoRA's median step / the run's median step after the cut, from runs that shared a loaded"
        " 2-core machine (rough).",
        "",
        "| run | val acc | vs LoRA | check: loss before -> after cut | train loss 5 steps before -> after |"
        " ratios used (heads, neurons, LoRA layers, LoRA ranks) | LoRA params | model params | median step |"
        " speed-up kept |",
        "|---|---:|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        label = TWEET_LABELS.get(name, name)
        delta = f"{100 * (r['val_acc'] - base['val_acc']):+.1f}" if base is not None and name != "lora" else ""
        if name == "lora" or "median_step_after_pruning_s" not in r:
            lines.append(
                f"| {label} | {r['val_acc']:.3f} | {delta} | | | | {r['lora_params_after']:,} |"
                f" {r['params_after']:,} | {r['median_step_s'] * 1e3:.0f} ms | |"
            )
            continue
        check = r.get("check") or {}
        if check.get("enabled"):
            measured = (
                f"{check['loss_before']:.3f} -> {check['loss_after_cut']:.3f} ({check['increase']:+.1%},"
                f" tolerance {check['tolerance']:.0%})"
            ) + (f", {len(check['spared'])} halving(s)" if check["spared"] else "")
            used = check["used"]
        else:
            measured, used = "-", None
        if used is None:
            used_text = "fixed"
        else:
            used_text = ", ".join(f"{v:.3g}" for v in used.values())
        train = (
            f"{r['train_loss_5_before_cut']:.3f} -> {r['train_loss_5_after_cut']:.3f}"
            if "train_loss_5_before_cut" in r
            else ""
        )
        speedup = f"{base['median_step_s'] / r['median_step_after_pruning_s']:.2f}x" if base is not None else ""
        if "speedup_alternated" in r:
            speedup = f"{r['speedup_alternated']['speedup']:.2f}x (in-run {speedup})"
        lines.append(
            f"| {label} | {r['val_acc']:.3f} | {delta} | {measured} | {train} | {used_text} |"
            f" {r['lora_params_after']:,} ({r['lora_params_after'] / r['lora_params_before']:.1%}) |"
            f" {r['params_after']:,} ({r['params_after'] / r['params_before']:.1%}) |"
            f" {r['median_step_before_pruning_s'] * 1e3:.0f} ms before the cut,"
            f" {r['median_step_after_pruning_s'] * 1e3:.0f} ms after | {speedup} |"
        )
    lines += _default_tolerance_note(results)
    lines += ["", "Target: the defaults within 1.5 points of plain LoRA.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--mode", choices=["cpu", "gpu", "tweets", "tweets-speed", "tweets-scores", "causal"], default="cpu"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds over unpruned/pruned (cpu 3, gpu 1)")
    parser.add_argument("--steps", type=int, default=150, help="tweets / causal: fine-tuning steps")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="causal: steps of pretraining the LM")
    parser.add_argument("--estimation-steps", type=int, default=50, help="tweets: EarlyPruning estimation steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="tweets: AdamW learning rate (LoRA)")
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=list(TWEET_RUNS),
        default=list(TWEET_RUNS)[:5],
        help="tweets: which runs (added to the existing results file when it exists)",
    )
    parser.add_argument("--seed", type=int, default=42, help="tweets: seed_everything seed (other than 42: own file)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 for cpu, 2 for tweets)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--tiny", action="store_true", help="cpu mode with tiny models, 1 round (seconds; the tests)")
    args = parser.parse_args()
    if args.mode == "gpu" and not torch.cuda.is_available():
        sys.exit("--mode gpu needs a CUDA device.")
    if args.mode != "gpu":
        torch.set_num_threads(args.threads or (1 if args.mode == "cpu" else 2))
    env = _env()
    env["load_average_at_start"] = os.getloadavg()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = f"pruning_{args.mode}" + ("_tiny" if args.tiny else "")
    if args.mode == "tweets" and args.steps != 150:  # the longer recipe has its own results file
        name += f"_{args.steps}steps"
    if args.mode == "tweets" and args.seed != 42:
        name += f"_seed{args.seed}"
    if args.mode == "tweets-speed":  # adds alternated timings to the tweet results of an earlier --mode tweets
        path = args.out_dir / "pruning_tweets.json"
        stored = json.loads(path.read_text())
        run_tweets_speed(stored["results"], args.lr)
        stored["env"]["speed_measured"] = env["date"]
        write_json(path, stored)
        markdown = _tweets_markdown(stored["results"], stored["env"], args)
        write_markdown(args.out_dir / "pruning_tweets.md", markdown)
        print(markdown)
        return
    if args.mode == "tweets-scores":
        results = run_tweets_scores(args.estimation_steps, args.lr)
        lines = [
            "# Ranking heads and neurons after a short estimation: Taylor vs magnitude (tweet task)",
            "",
            f"{env['date']}: MiniLM + LoRA r=8, seed 42, {args.estimation_steps} estimation steps of batch 16, lr"
            f" {args.lr}. Relative increase of the loss on 16 validation batches (eval mode) when the paper's ratios"
            f" (1/3) are cut as each score ranks (loss before: {results['val_loss_before']:.4f}; coefficient of"
            f" variation of the mask values: {results['mask_spread']:.4f}).",
            "",
            "| cut | Taylor |mask x grad| | magnitude |mask| |",
            "|---|---:|---:|",
            *[
                f"| {cut} | {results[f'taylor/{cut}']:+.1%} | {results[f'magnitude/{cut}']:+.1%} |"
                for cut in ("heads", "neurons", "heads_and_neurons")
            ],
            "",
        ]
        write_json(args.out_dir / "pruning_tweets_scores.json", {"env": env, "results": results})
        write_markdown(args.out_dir / "pruning_tweets_scores.md", "\n".join(lines))
        print("\n".join(lines))
        return
    if args.mode == "causal":
        results = run_causal(args.pretrain_steps, args.steps, args.estimation_steps, args.lr, list(CAUSAL_RUNS))
        markdown = _causal_markdown(results, env, args)
    elif args.mode == "tweets":
        previous = args.out_dir / f"{name}.json"
        results = {}
        for run in args.runs:  # written after every run, merged with what another invocation wrote meanwhile
            row = run_tweets(args.steps, args.estimation_steps, args.lr, [run], args.seed)
            results = json.loads(previous.read_text())["results"] if previous.exists() else {}
            results.update(row)
            results = {k: results[k] for k in TWEET_RUNS if k in results}
            write_results(args.out_dir, name, {"env": env, "results": results})
            write_markdown(args.out_dir / f"{name}.md", _tweets_markdown(results, env, args))
        markdown = _tweets_markdown(results, env, args)
    else:
        size_key = "tiny" if args.tiny else args.mode
        rounds = args.rounds or (3 if size_key == "cpu" else 1)
        warmup, steps = {"cpu": (2, 5), "tiny": (1, 2), "gpu": (3, 10)}[size_key]
        regimes = {"vit": ["full", "lora"], "llama": ["full", "lora"] if args.mode == "cpu" else ["lora"]}
        results = run_speed(size_key, rounds, warmup, steps, regimes)
        markdown = _speed_markdown(args.mode, results, env)
    write_results(args.out_dir, name, {"env": env, "results": results})
    write_markdown(args.out_dir / f"{name}.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
