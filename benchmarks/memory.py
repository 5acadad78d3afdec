"""Memory and step time of full fine-tuning, LISA, LoRA and activation quantization, side by side in one run.

For a timm ViT and a Hugging Face Llama-style causal LM (random weights, synthetic inputs) every method trains
through a real ``lightning.pytorch.Trainer`` with AdamW (bitsandbytes ``AdamW8bit`` where named):

* ``full``      -- full fine-tuning, AdamW over every parameter;
* ``lisa``      -- ``LISA(n_layers=2, interval=K)`` of this package: frozen blocks' optimizer state is released;
* ``lisa_kept`` -- ``LISA(..., release_optimizer_state=False)``, as public implementations do; it runs until every
  block was sampled once (its kept state is then at steady state) before it is timed;
* ``lora``      -- HF peft LoRA r=16, alpha 32 on the attention and MLP Linear layers (ViT head in
  ``modules_to_save``; the LM's embeddings and head frozen, as peft leaves them);
* ``full_int8`` / ``full_fp8_e4m3`` -- full fine-tuning with the ``ActivationQuantization`` callback of this
  package storing the tensors saved for backward in int8 / FP8 E4M3 (``compile=True``: fused kernels);
* ``lisa_int8_adamw8bit`` -- the full memory combination: LISA (state released) + int8 activations + bitsandbytes
  ``AdamW8bit`` (8-bit optimizer state).

Methods of one model run one after the other in the same process, in an order that rotates with each repeat, so
machine noise affects all alike; ratios are against full fine-tuning.

Memory is measured two ways. Components (both modes): unique storage bytes of the parameters, of the gradients
(max over steps, taken in ``on_before_optimizer_step``), of the optimizer state (after the last step) and of the
tensors saved for backward during one forward (``torch.autograd.graph.saved_tensors_hooks``, parameters excluded;
with activation quantization, the bytes the quantizer really keeps -- 8-bit data, scales and what it leaves as it
is -- from the callback's own statistics, since a second hook inside it would shadow it);
``--mode cpu`` reports their sum (and the process's peak RSS delta, indicative only). ``--mode gpu`` reports
``torch.cuda.max_memory_allocated()`` over the timed steps. Step time is the median wall time of a training step
(``on_train_batch_start`` to ``on_train_batch_end``, CUDA-synchronised) after warm-up. The trainable-set
controller's own cost is what it reports of each optimizer-step boundary (``TrainableSetController.last_boundary``).
The measuring code is :mod:`benchmarks.harness`'s, the peers are built by :mod:`benchmarks.peers`.

Run from the repository root::

    python -m benchmarks.memory                # --mode cpu: small models, fp32, about 2.5 minutes on 2 cores
    python -m benchmarks.memory --mode gpu     # ViT-B/16, ViT-L/16, Llama 1.1B in bf16-mixed on one GPU

Results go to ``benchmarks/results/memory_<mode>.json`` (raw numbers) and ``.md`` (tables, targets).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_peft.callbacks import ActivationQuantization
from lightning_peft.quantization import DEFAULT_MIN_NUMEL

from .harness import RESULTS_DIR, MeasuringCallback, ProcessMemory, environment, write_results
from .peers import CLOSURE_FIRST, PEERS, GaLoreSettings, build_optimizer, enable_checkpointing, optimizer_step
from .recipes import Recipe, with_registered

QUANT_GROUP_SIZE = 128
LISA_LAYERS = 2
LORA_RANK = 16
LORA_ALPHA = 32


def _lisa(schedule: Schedule) -> dict[str, Any]:
    return {"n_layers": LISA_LAYERS, "interval": schedule.lisa_interval, "seed": 0}


def _lisa_kept(schedule: Schedule) -> dict[str, Any]:
    return {**_lisa(schedule), "interval": schedule.kept_interval, "release_optimizer_state": False}


# Every run, keyed as the results name it: the registry's method that chooses what trains (with its settings here)
# and what it is combined with. What users would pick instead, and combinations with them (benchmarks.peers.PEERS),
# are in memory_cpu_peers.* (BAdam and GaLore need the `bench` extra: pip install badam galore-torch). Activation
# checkpointing of every block: timm `set_grad_checkpointing()`, transformers `activation_checkpointing_enable()`
# (`gradient_checkpointing_enable()` before 5.24), non-reentrant.
RECIPES: dict[str, Recipe] = {
    "full": Recipe("Full FT (AdamW)"),
    "lisa": Recipe("LISA, state released (ours)", "lisa", _lisa),
    "lisa_kept": Recipe("LISA, state kept", "lisa", _lisa_kept, cover_blocks=True, estimated=False),
    "lora": Recipe("LoRA r=16 (peft)", "lora", {"r": LORA_RANK, "alpha": LORA_ALPHA}, peft=True),
    "full_int8": Recipe("Full FT + int8 activations", activations="int8", unquantized="full"),
    "full_fp8_e4m3": Recipe("Full FT + fp8_e4m3 activations", activations="fp8_e4m3", unquantized="full"),
    "lisa_int8_adamw8bit": Recipe(
        "LISA + int8 activations + AdamW8bit",
        "lisa",
        _lisa,
        activations="int8",
        optimizer="adamw8bit",
        unquantized="lisa",
    ),
    "full_checkpointing": Recipe("Full FT + activation checkpointing", checkpointing=True),
    "full_offload": Recipe("Full FT + saved activations offloaded to CPU", offload=True),
    "badam": Recipe("BAdam (badam, 1 block)", optimizer="badam"),
    "galore": Recipe("GaLore AdamW (galore-torch)", optimizer="galore"),
    "lisa_checkpointing": Recipe("LISA + activation checkpointing", "lisa", _lisa, checkpointing=True),
    "full_int8_checkpointing": Recipe(
        "Full FT + int8 activations + checkpointing",
        activations="int8",
        checkpointing=True,
        unquantized="full_checkpointing",
    ),
}
METHODS = tuple(RECIPES)
PEER_METHODS = PEERS
# Methods with activation quantization: the method that is the same run without it.
UNQUANTIZED = {key: recipe.unquantized for key, recipe in RECIPES.items() if recipe.unquantized is not None}


def recipes() -> dict[str, Recipe]:
    """:data:`RECIPES` and a run of every method registered beyond the built-in ones (with its defaults)."""
    return with_registered(RECIPES)


def label(method: str) -> str:
    """The label of the run ``method`` (its key, for a run of a method not registered here)."""
    recipe = recipes().get(method)
    return method if recipe is None else recipe.label


# BAdam: one block trains at a time (embeddings and head frozen, its defaults), switching every LISA interval;
# GaLore: AdamW with the gradients of 2-D block weights projected to rank GALORE_RANK.
GALORE_RANK = {"vit": 64, "llama": 64}
GALORE_UPDATE_GAP = 200
GALORE_SCALE = 0.25
LORA_TARGETS = {
    "vit": ["qkv", "proj", "fc1", "fc2"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# Reference targets, for one H100: LISA (released) memory <= LoRA's and <= the model's ratio of full FT,
# LISA step time <= 0.8x full FT.
STEP_TIME_TARGET = 0.8
# Activation quantization: saved-for-backward bytes <= 0.55x the unquantized run (each format), step time
# <= 1.15x the unquantized run (GPU only: it asks for fused kernels), and LISA + int8 activations + AdamW8bit at most
# 0.45x full fine-tuning's peak on the 1.1B Llama (``ModelSpec.combination_target``).
SAVED_BYTES_TARGET = 0.55
QUANT_STEP_TIME_TARGET = 1.15


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: how to build it and the batch it trains on."""

    key: str
    label: str
    family: str  # "vit" (timm) or "llama" (transformers)
    config: dict[str, Any]
    batch_size: int
    seq_len: int = 0  # tokens per sequence (llama)
    num_classes: int = 0  # head size (vit)
    memory_target: float | None = None  # target LISA / full FT memory ratio, where one is set
    combination_target: float | None = None  # target (LISA + int8 activations + AdamW8bit) / full FT memory ratio


@dataclass(frozen=True)
class SmallTensors:
    """Size thresholds below which tensors stay unquantized, scaled with the models of one ``sizes``.

    The package defaults are set for GPU-sized models; the CPU and tiny models' activations are hundreds of times
    smaller, and would mostly fall under them, so the thresholds shrink with the models.
    """

    min_numel: int  # ActivationQuantization: tensors saved for backward with fewer elements are kept as they are
    min_8bit_size: int  # AdamW8bit: parameters with fewer elements keep 32-bit state


@dataclass(frozen=True)
class Schedule:
    """Steps per method. LISA samples every ``lisa_interval`` steps, so samplings fall inside the timed steps."""

    warmup: int
    timed: int
    lisa_interval: int
    kept_interval: int  # small, so that every block is sampled (and keeps state) after a few periods
    max_coverage_steps: int  # cap on the extra warm-up steps that LISA-kept may take to sample every block
    repeats: int


def _vit(key, label, name, batch_size, num_classes, memory_target=None, **kwargs) -> ModelSpec:
    config = {"model_name": name, **kwargs}
    return ModelSpec(key, label, "vit", config, batch_size, num_classes=num_classes, memory_target=memory_target)


def _llama(key, label, batch_size, seq_len, memory_target=None, combination_target=None, **kwargs) -> ModelSpec:
    return ModelSpec(
        key,
        label,
        "llama",
        kwargs,
        batch_size,
        seq_len=seq_len,
        memory_target=memory_target,
        combination_target=combination_target,
    )


SIZES: dict[str, list[ModelSpec]] = {
    "gpu": [
        _vit("vit_b16", "ViT-B/16, 64 x 224^2", "vit_base_patch16_224", 64, 1000, memory_target=0.75),
        _vit("vit_l16", "ViT-L/16, 32 x 224^2", "vit_large_patch16_224", 32, 1000),
        _llama(
            "llama_1b",
            "Llama 1.1B (TinyLlama shape), 4 x 1024 tokens",
            4,
            1024,
            memory_target=0.6,
            combination_target=0.45,
            hidden_size=2048,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            intermediate_size=5632,
            vocab_size=32000,
        ),
    ],
    "cpu": [
        _vit(
            "vit_s_d8",
            "ViT-S/16 widths, depth 8, 8 x 64^2",
            "vit_small_patch16_224",
            8,
            100,
            memory_target=0.75,
            img_size=64,
            depth=8,
        ),
        _llama(
            "llama_8l",
            "Llama, hidden 256, 8 layers, 2 x 128 tokens",
            2,
            128,
            memory_target=0.6,
            combination_target=0.45,
            hidden_size=256,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=688,
            vocab_size=4096,
        ),
    ],
    "tiny": [
        _vit(
            "vit_tiny",
            "ViT, width 32, depth 4, 2 x 32^2",
            "vit_tiny_patch16_224",
            2,
            10,
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=4,
            num_heads=2,
        ),
        _llama(
            "llama_tiny",
            "Llama, hidden 32, 4 layers, 2 x 16 tokens",
            2,
            16,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            vocab_size=128,
        ),
    ],
}
# The CPU models at batches where saved activations outweigh parameters, as at the GPU sizes: the regime in which
# LISA's advantage over LoRA (a frozen Linear keeps no input) shows. Written to memory_cpu_activations.*.
_cpu_vit, _cpu_llama = SIZES["cpu"]
SIZES["cpu_activations"] = [
    replace(_cpu_vit, key="vit_s_d8_b64", label="ViT-S/16 widths, depth 8, 64 x 64^2", batch_size=64),
    replace(
        _cpu_llama, key="llama_8l_8x512", label="Llama, hidden 256, 8 layers, 8 x 512 tokens", batch_size=8, seq_len=512
    ),
]
SCHEDULES = {
    "gpu": Schedule(warmup=3, timed=10, lisa_interval=5, kept_interval=1, max_coverage_steps=100, repeats=1),
    "cpu": Schedule(warmup=2, timed=3, lisa_interval=3, kept_interval=1, max_coverage_steps=40, repeats=5),
    "cpu_activations": Schedule(warmup=1, timed=2, lisa_interval=2, kept_interval=1, max_coverage_steps=20, repeats=1),
    "tiny": Schedule(warmup=1, timed=2, lisa_interval=2, kept_interval=1, max_coverage_steps=20, repeats=1),
}
SMALL_TENSORS = {
    "gpu": SmallTensors(min_numel=DEFAULT_MIN_NUMEL, min_8bit_size=4096),  # the package's and bitsandbytes' defaults
    "cpu": SmallTensors(min_numel=4096, min_8bit_size=4096),
    "cpu_activations": SmallTensors(min_numel=4096, min_8bit_size=4096),
    "tiny": SmallTensors(min_numel=512, min_8bit_size=256),
}


# ---------------------------------------------------------------------------------------------- models and data


def build_model(spec: ModelSpec, method: str) -> nn.Module:
    """Build ``spec`` with random weights (on the current default device) for the run ``method`` (a key of
    :func:`recipes`): wrapped in LoRA, checkpointed, or with only what the method trains trainable, as it says."""
    recipe = recipes()[method]
    from peft import LoraConfig, get_peft_model

    if spec.family == "vit":
        import timm

        config = dict(spec.config)
        model = timm.create_model(config.pop("model_name"), pretrained=False, num_classes=spec.num_classes, **config)
        lora = LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS["vit"], modules_to_save=["head"]
        )
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            **spec.config,
            max_position_embeddings=max(spec.seq_len, 2048),
            tie_word_embeddings=False,
            use_cache=False,  # training: no KV cache in the outputs
            attn_implementation="sdpa",
        )
        model = LlamaForCausalLM(config)
        lora = LoraConfig(
            task_type="CAUSAL_LM", r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS["llama"]
        )
    if recipe.checkpointing:
        enable_checkpointing(model)
    return get_peft_model(model, lora) if recipe.peft else recipe.prepare(model)


def make_batch(spec: ModelSpec, device: torch.device) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    if spec.family == "vit":
        img_size = spec.config.get("img_size", 224)
        images = torch.randn(spec.batch_size, 3, img_size, img_size, generator=generator)
        labels = torch.randint(0, spec.num_classes, (spec.batch_size,), generator=generator)
        return images.to(device), labels.to(device)
    tokens = torch.randint(0, spec.config["vocab_size"], (spec.batch_size, spec.seq_len), generator=generator)
    return (tokens.to(device),)


class RepeatedBatch:
    """The same (already on-device) batch, ``length`` times: synthetic data with no loading cost."""

    def __init__(self, batch: tuple[Tensor, ...], length: int) -> None:
        self.batch = batch
        self.length = length

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        return (self.batch for _ in range(self.length))

    def __len__(self) -> int:
        return self.length


class BenchModule(pl.LightningModule):
    """Wraps a ViT (images, labels -> cross-entropy) or a causal LM (token ids -> next-token loss).

    ``optimizer``: one of :data:`benchmarks.peers.OPTIMIZERS`: ``"adamw"`` (torch), ``"adamw8bit"`` (bitsandbytes,
    ``min_8bit_size``), ``"badam"`` (BAdam's ``BlockOptimizer`` around AdamW, one block at a time, switching every
    ``switch_every`` steps) or ``"galore"`` (galore-torch ``GaLoreAdamW``, the 2-D weights of the blocks projected).
    """

    def __init__(
        self,
        model: nn.Module,
        family: str,
        lr: float = 1e-4,
        optimizer: str = "adamw",
        min_8bit_size: int = 4096,
        switch_every: int = 3,
    ) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.lr = lr
        self.optimizer_kind = optimizer
        self.min_8bit_size = min_8bit_size
        self.switch_every = switch_every

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self.loss(batch)

    def loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        if self.family == "vit":
            images, labels = batch
            return F.cross_entropy(self.model(images), labels)
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(
            self,
            self.optimizer_kind,
            self.lr,
            min_8bit_size=self.min_8bit_size,
            switch_every=self.switch_every,
            galore=GaLoreSettings(GALORE_RANK[self.family], GALORE_UPDATE_GAP, GALORE_SCALE),
        )

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if self.optimizer_kind in CLOSURE_FIRST:
            return optimizer_step(optimizer, optimizer_closure)
        return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)


# --------------------------------------------------------------------------------------------------- measuring


def measure(
    spec: ModelSpec,
    method: str,
    schedule: Schedule,
    device: torch.device,
    precision: str,
    root: str,
    small_tensors: SmallTensors = SMALL_TENSORS["gpu"],
    compile: bool | None = None,
) -> dict[str, Any]:
    """Train ``spec`` with ``method`` for the schedule's steps through a Lightning Trainer; return its numbers.

    ``compile``: fuse the activation quantization with ``torch.compile``; ``None`` does so on GPU only.
    """
    cuda = device.type == "cuda"
    compile = cuda if compile is None else compile
    recipe = recipes()[method]
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    allocated_before = torch.cuda.memory_allocated() if cuda else None  # what an earlier method left behind
    process = ProcessMemory()
    process.reset()
    torch.manual_seed(0)  # same weights for every method (the caller's RNG state is restored by `run`)
    with device:
        model = build_model(spec, method)
    module = BenchModule(
        model,
        spec.family,
        optimizer=recipe.optimizer,
        min_8bit_size=small_tensors.min_8bit_size,
        switch_every=schedule.lisa_interval,
    )
    batch = make_batch(spec, device)
    quantization = None
    if recipe.activations is not None:
        quantization = ActivationQuantization(
            format=recipe.activations,
            group_size=QUANT_GROUP_SIZE,
            min_numel=small_tensors.min_numel,
            compile=compile,
            log_bytes=False,  # no other method logs per step: Lightning's `log` would be timed for these only
        )
    probe = MeasuringCallback(
        warmup=schedule.warmup,
        timed=schedule.timed,
        cover_blocks=recipe.cover_blocks,
        max_coverage_steps=schedule.max_coverage_steps,
        quantization=quantization,
        offload=recipe.offload,
    )
    callbacks: list[Callback] = [probe, *recipe.callbacks(schedule=schedule)]
    if quantization is not None:
        callbacks.append(quantization)
    steps = schedule.warmup + schedule.max_coverage_steps + schedule.timed
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=callbacks,  # the probe first: its batch-start timer runs before LISA's controller
    )
    trainer.fit(module, train_dataloaders=RepeatedBatch(batch, steps))
    result = dict(probe.results)
    if len(probe.timed_seconds) != schedule.timed:
        raise RuntimeError(f"{spec.key}/{method}: timed {len(probe.timed_seconds)} steps, expected {schedule.timed}")
    result["step_times_ms"] = [1000 * t for t in probe.timed_seconds]
    result["rss_peak_delta_bytes"] = None if cuda else process.peak_delta()
    result["gpu_allocated_before_build_bytes"] = allocated_before
    if probe.boundaries:
        result["controller_boundaries"] = [asdict(b) for b in probe.boundaries]
    del trainer, module, model, batch, probe, callbacks, quantization
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def _summarise(runs: list[dict[str, Any]], cuda: bool) -> dict[str, Any]:
    """Combine the repeats of one method: memory from the largest repeat, the median of all timed steps."""
    last = runs[-1]
    components = {
        key: max(r[key] for r in runs)
        for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "saved_activation_bytes")
    }
    step_times = [t for r in runs for t in r["step_times_ms"]]
    summary = {
        "components": components,
        "components_total_bytes": sum(components.values()),
        "step_time_ms": statistics.median(step_times),
        "step_time_min_ms": min(step_times),
        "step_times_ms": step_times,
        "trainable_params": last["trainable_params"],
        "total_params": last["total_params"],
        "blocks_with_state": last["blocks_with_state"],
        "n_blocks": last["n_blocks"],
        "warmup_steps": last["warmup_steps"],
    }
    if cuda:
        summary["gpu_peak_timed_bytes"] = max(r["gpu_peak_timed_bytes"] for r in runs)
        summary["gpu_peak_warmup_bytes"] = max(r["gpu_peak_warmup_bytes"] for r in runs)
        summary["gpu_allocated_at_start_bytes"] = last["gpu_allocated_at_start_bytes"]
        summary["gpu_allocated_before_build_bytes"] = max(r["gpu_allocated_before_build_bytes"] for r in runs)
        summary["memory_bytes"] = summary["gpu_peak_timed_bytes"]
    else:
        rss = [r["rss_peak_delta_bytes"] for r in runs]
        summary["rss_peak_delta_bytes"] = None if None in rss else max(rss)
        summary["memory_bytes"] = summary["components_total_bytes"]
    if "controller_boundaries" in last:
        summary["controller"] = _controller_summary(runs)
    if "quantization" in last:
        summary["quantization"] = last["quantization"]  # the counted step is the same in every repeat
    return summary


def _controller_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Costs of the controller's optimizer-step boundaries (``TrainableSetController.last_boundary``), by kind: the
    first of a run (the initial freeze, and Lightning's first ``log`` call of the fit), a boundary where the
    trainable set changes, and one where it does not."""
    calls = []
    for run in runs:
        for index, boundary in enumerate(run["controller_boundaries"]):
            kind = "first" if index == 0 else "change" if boundary["changed"] else "unchanged"
            calls.append({"kind": kind, "us": boundary["total_ns"] / 1000, "logging_us": boundary["logging_ns"] / 1000})
    return {"calls": calls, **_controller_stats(calls)}


def _controller_stats(calls: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(kind: str | None, key: str = "us") -> float | None:
        values = [c[key] for c in calls if kind is None or c["kind"] == kind]
        return statistics.fmean(values) if values else None

    later = [c["us"] for c in calls if c["kind"] != "first"]
    change, unchanged = mean("change"), mean("unchanged")
    return {
        "steps": len(calls),
        "steps_with_change": sum(c["kind"] == "change" for c in calls),
        "mean_us": mean(None),
        "mean_us_without_logging": statistics.fmean(c["us"] - c["logging_us"] for c in calls) if calls else None,
        "mean_us_after_first": statistics.fmean(later) if later else None,
        "max_us_after_first": max(later, default=None),
        "first_us": mean("first"),
        "first_logging_us": mean("first", "logging_us"),
        "change_us": change,
        "change_logging_us": mean("change", "logging_us"),
        "unchanged_us": unchanged,
        # LISA's default interval 20: one change and 19 unchanged steps per period.
        "projected_mean_us_at_interval_20": (
            None if change is None or unchanged is None else (change + 19 * unchanged) / 20
        ),
    }


def _controller_cost(models: dict[str, Any]) -> dict[str, Any]:
    """The controller's cost per step over the LISA (ours) runs of every model."""
    calls = [
        c
        for model in models.values()
        if "lisa" in model["methods"]
        for c in model["methods"]["lisa"]["controller"]["calls"]
    ]
    return _controller_stats(calls)


def _compare_with_unquantized(methods: dict[str, dict[str, Any]]) -> None:
    """Ratios of each activation-quantized method to the same run without quantization (in place).

    ``counter_agreement`` checks the two ways of counting: the quantizer's ``bytes_before`` (what the quantized run
    would have saved without quantization) over this script's counter on the unquantized run; 1.0 when they agree.
    """
    for method, base in UNQUANTIZED.items():
        if method not in methods or base not in methods:
            continue
        quantized, unquantized = methods[method], methods[base]
        saved = unquantized["components"]["saved_activation_bytes"]
        quantized["unquantized_method"] = base
        quantized["saved_bytes_ratio"] = quantized["components"]["saved_activation_bytes"] / saved
        quantized["counter_agreement"] = quantized["quantization"]["bytes_before"] / saved
        quantized["memory_ratio_unquantized"] = quantized["memory_bytes"] / unquantized["memory_bytes"]
        quantized["step_time_ratio_unquantized"] = quantized["step_time_ms"] / unquantized["step_time_ms"]


def _targets(spec: ModelSpec, methods: dict[str, dict[str, Any]], gpu: bool) -> list[dict[str, Any]]:
    """The reference targets that this run's methods allow checking; ``applies`` is False for GPU-only ones on CPU."""
    full, lisa, lora = methods["full"], methods.get("lisa"), methods.get("lora")
    targets = []
    if lisa is not None and lora is not None:
        targets.append(
            {
                "target": "LISA memory <= LoRA memory",
                "value": lisa["memory_bytes"] / lora["memory_bytes"],
                "threshold": 1.0,
            }
        )
    if lisa is not None and spec.memory_target is not None:
        targets.append(
            {
                "target": f"LISA memory <= {spec.memory_target}x full FT",
                "value": lisa["memory_bytes"] / full["memory_bytes"],
                "threshold": spec.memory_target,
            }
        )
    if lisa is not None:
        targets.append(
            {
                "target": f"LISA step time <= {STEP_TIME_TARGET}x full FT",
                "value": lisa["step_time_ms"] / full["step_time_ms"],
                "threshold": STEP_TIME_TARGET,
            }
        )
    for method in UNQUANTIZED:
        m = methods.get(method)
        if m is None or "saved_bytes_ratio" not in m:
            continue
        base = label(m["unquantized_method"])
        targets.append(
            {
                "target": f"{label(method)}: saved-for-backward bytes <= {SAVED_BYTES_TARGET}x {base}",
                "value": m["saved_bytes_ratio"],
                "threshold": SAVED_BYTES_TARGET,
            }
        )
    if spec.combination_target is not None and "lisa_int8_adamw8bit" in methods:
        targets.append(
            {
                "target": f"{label('lisa_int8_adamw8bit')} memory <= {spec.combination_target}x full FT",
                "value": methods["lisa_int8_adamw8bit"]["memory_ratio"],
                "threshold": spec.combination_target,
            }
        )
    for method in [k for k, r in recipes().items() if r.activations is not None and r.unquantized == "full"]:
        m = methods.get(method)
        if m is None or "step_time_ratio_unquantized" not in m:
            continue
        targets.append(
            {
                "target": f"{label(method)}: step time <= {QUANT_STEP_TIME_TARGET}x"
                f" {label(m['unquantized_method'])} (GPU target)",
                "value": m["step_time_ratio_unquantized"],
                "threshold": QUANT_STEP_TIME_TARGET,
                "applies": gpu,
            }
        )
    for target in targets:
        target.setdefault("applies", True)
        target["met"] = target["value"] <= target["threshold"]
    return targets


def run(
    mode: str = "cpu",
    sizes: str | None = None,
    out_dir: str | os.PathLike | None = None,
    repeats: int | None = None,
    models: list[str] | None = None,
    threads: int | None = None,
    methods: list[str] | None = None,
    compile: bool | None = None,
    tag: str | None = None,
) -> dict[str, Any]:
    """Measure every method on every model of ``sizes``; write ``memory_<mode>.json`` and ``.md`` to ``out_dir``.

    Args:
        mode: ``"cpu"`` (fp32, memory as the sum of the counted components) or ``"gpu"`` (bf16-mixed, CUDA peak).
        sizes: ``"gpu"``, ``"cpu"``, ``"cpu_activations"`` (CPU models at activation-heavy batches, written to
            ``memory_cpu_activations.*``) or ``"tiny"`` (for tests); defaults to ``mode``.
        out_dir: where the results go; defaults to ``benchmarks/results``.
        repeats: rounds over the methods (order rotated each round); defaults to the schedule's.
        models: keys of the models to run (default: all of ``sizes``).
        threads: torch intra-op threads; ``None`` keeps torch's default on GPU and uses 1 on CPU, where other jobs
            on a shared machine deschedule threads and make multi-threaded step times erratic.
        methods: keys of the methods to run (default: all of :func:`recipes`); ``full``, which the ratios are
            against, always runs, and so does the unquantized run of each activation-quantized method.
        compile: fuse the activation quantization with ``torch.compile`` (as the GPU runs must: the eager kernels'
            extra passes over memory are what costs there). ``None`` (default): on, except for ``sizes="tiny"``
            (tests: no compilation, no C++ toolchain needed). On CPU the compilation costs about 12 s in all.
        tag: suffix of the result files (``memory_<mode>_<tag>.*``), so a run of some methods keeps the others.

    Returns:
        The results, as written to the JSON file.
    """
    if mode not in ("cpu", "gpu"):
        raise ValueError(f"`mode` must be 'cpu' or 'gpu', got {mode!r}.")
    if mode == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("`--mode gpu` needs a CUDA device and none is available. HINT: run `--mode cpu` here.")
    sizes = sizes or mode
    specs = [s for s in SIZES[sizes] if models is None or s.key in models]
    if not specs:
        raise ValueError(f"no model of sizes {sizes!r} matches {models}; known: {[s.key for s in SIZES[sizes]]}")
    table = recipes()
    unknown = sorted(set(methods or ()) - set(table))
    if unknown:
        raise ValueError(
            f"unknown method(s) {unknown}: `methods` must be among {list(table)}. HINT: leave it out for all, or"
            " register the method in lightning_peft.methods."
        )
    wanted = set(methods or table) | {"full"}
    wanted |= {table[m].unquantized for m in wanted if table[m].unquantized is not None}
    selected = tuple(m for m in table if m in wanted)
    schedule = SCHEDULES[sizes]
    if repeats is not None:
        schedule = Schedule(**{**asdict(schedule), "repeats": repeats})
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    if threads is None and mode == "cpu":
        threads = 1
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            fuse = sizes != "tiny" if compile is None else compile
            return _run(specs, schedule, mode, sizes, device, out_dir, selected, fuse, tag)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    specs: list[ModelSpec],
    schedule: Schedule,
    mode: str,
    sizes: str,
    device: torch.device,
    out_dir: Path | None,
    selected: tuple[str, ...] = METHODS,
    compile: bool = False,
    tag: str | None = None,
) -> dict[str, Any]:
    precision = "bf16-mixed" if mode == "gpu" else "32-true"
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "mode": mode,
        "sizes": sizes,
        "precision": precision,
        "environment": environment(
            device,
            packages=("timm", "transformers", "peft", "bitsandbytes"),
            cuda_version=True,
            commit=True,
        ),
        "schedule": asdict(schedule),
        "lisa": {"n_layers": LISA_LAYERS, "interval": schedule.lisa_interval, "kept_interval": schedule.kept_interval},
        "lora": {"r": LORA_RANK, "alpha": LORA_ALPHA, "target_modules": LORA_TARGETS},
        "activation_quantization": {
            "formats": {m: recipes()[m].activations for m in selected if recipes()[m].activations is not None},
            "group_size": QUANT_GROUP_SIZE,
            "compile": compile,
            **asdict(SMALL_TENSORS[sizes]),
        },
        "methods": list(selected),
        "models": {},
    }
    with tempfile.TemporaryDirectory() as root:
        for spec in specs:
            runs: dict[str, list[dict[str, Any]]] = {m: [] for m in selected}
            for round_index in range(schedule.repeats):
                shift = round_index % len(selected)
                for method in selected[shift:] + selected[:shift]:
                    print(f"[{spec.key}] round {round_index + 1}/{schedule.repeats}: {method}", flush=True)
                    runs[method].append(
                        measure(spec, method, schedule, device, precision, root, SMALL_TENSORS[sizes], compile)
                    )
            methods = {m: _summarise(runs[m], device.type == "cuda") for m in selected}
            full = methods["full"]
            for summary in methods.values():
                summary["memory_ratio"] = summary["memory_bytes"] / full["memory_bytes"]
                summary["step_time_ratio"] = summary["step_time_ms"] / full["step_time_ms"]
            _compare_with_unquantized(methods)
            results["models"][spec.key] = {
                "label": spec.label,
                "family": spec.family,
                "config": spec.config,
                "batch_size": spec.batch_size,
                "seq_len": spec.seq_len or None,
                "methods": methods,
                "targets": _targets(spec, methods, device.type == "cuda"),
            }
    results["controller_cost"] = _controller_cost(results["models"])
    results["wall_time_s"] = time.perf_counter() - started
    # `tiny` (tests) writes where `cpu` does; other size sets that are not their mode's get files of their own
    stem = f"memory_{mode}" if sizes in (mode, "tiny") else f"memory_{sizes}"
    if tag:
        stem += f"_{tag}"
    write_results(out_dir, stem, results, render_markdown)
    return results


# --------------------------------------------------------------------------------------------------- reporting


def _format_bytes(n: int | None, unit: str) -> str:
    if n is None:
        return "n/a"
    scale = 2**30 if unit == "GiB" else 2**20
    return f"{n / scale:.2f}" if unit == "GiB" else f"{n / scale:.1f}"


def _format_us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _format_count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def render_markdown(results: dict[str, Any]) -> str:
    """Tables per model (memory, ratio, step time, ratio, trainable params), the targets and the controller cost."""
    env = results["environment"]
    gpu = results["mode"] == "gpu"
    unit = "GiB" if gpu else "MiB"
    memory_name = "peak allocated" if gpu else "params+grads+state+saved"
    lines = [
        f"# Memory and step time, `--mode {results['mode']}`",
        "",
        f"{env['date']} on {env['device']} ({env['cpu_count']} CPUs, {env['torch_threads']} torch threads);"
        f" torch {env['torch']}, lightning {env['lightning']}, timm {env['timm']}, transformers"
        f" {env['transformers']}, peft {env['peft']}, bitsandbytes {env.get('bitsandbytes')}; precision"
        f" `{results['precision']}`, AdamW (bitsandbytes AdamW8bit where named); sizes"
        f" `{results['sizes']}`. Generated by `python -m benchmarks.memory --mode {results['mode']}`"
        " (see `benchmarks/README.md`).",
        "",
        f"LISA: {results['lisa']['n_layers']} blocks, interval {results['lisa']['interval']} (ours, state released);"
        f" the kept-state variant uses interval {results['lisa']['kept_interval']} and is timed only once every block"
        f" has optimizer state. LoRA: r={results['lora']['r']}, alpha={results['lora']['alpha']}."
        f" Schedule: {results['schedule']['warmup']} warm-up + {results['schedule']['timed']} timed steps per method,"
        f" {results['schedule']['repeats']} round(s), methods interleaved.",
    ]
    quant = results.get("activation_quantization")
    if quant and quant["formats"]:
        lines += [
            "",
            f"Activation quantization: `ActivationQuantization(format=..., group_size={quant['group_size']},"
            f" min_numel={quant['min_numel']}, compile={quant['compile']}, log_bytes=False)`; AdamW8bit with"
            f" `min_8bit_size={quant['min_8bit_size']}`. Saved activations of these methods are the bytes the"
            " quantizer keeps (8-bit data, scales, tensors left as they are), from the callback's statistics.",
        ]
    for model in results["models"].values():
        batch = f"batch {model['batch_size']}" + (f" x {model['seq_len']} tokens" if model["seq_len"] else "")
        lines += [
            "",
            f"## {model['label']} ({batch})",
            "",
            f"| Method | Memory ({unit}, {memory_name}) | x full FT | Step, median (ms) | x full FT | Step, min (ms)"
            " | Trainable params"
            f" | Params ({unit}) | Grads ({unit}) | Optimizer state ({unit}) | Saved activations ({unit})"
            " | Blocks with state |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for method, m in model["methods"].items():
            c = m["components"]
            lines.append(
                f"| {label(method)} | {_format_bytes(m['memory_bytes'], unit)} | {m['memory_ratio']:.2f}"
                f" | {m['step_time_ms']:.1f} | {m['step_time_ratio']:.2f} | {m['step_time_min_ms']:.1f}"
                f" | {_format_count(m['trainable_params'])} of {_format_count(m['total_params'])}"
                f" | {_format_bytes(c['param_bytes'], unit)} | {_format_bytes(c['grad_bytes'], unit)}"
                f" | {_format_bytes(c['optimizer_state_bytes'], unit)}"
                f" | {_format_bytes(c['saved_activation_bytes'], unit)}"
                f" | {m['blocks_with_state']}/{m['n_blocks']} |"
            )
        quantized = {k: m for k, m in model["methods"].items() if "saved_bytes_ratio" in m}
        if quantized:
            lines += [
                "",
                f"Activation quantization, against the same run without it (saved bytes in {unit}):",
                "",
                "| Method | Format | Unquantized run | Saved, without quantization (quantizer's count) | Saved, kept"
                " | Kept / without | x unquantized run's saved | Quantizer's count / counter on unquantized run"
                " | Tensors quantized of saved (deduplicated) | Memory x unquantized run | Step x unquantized run |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for method, m in quantized.items():
                q = m["quantization"]
                ratio = q["bytes_after"] / q["bytes_before"] if q["bytes_before"] else float("nan")
                lines.append(
                    f"| {label(method)} | {results['activation_quantization']['formats'][method]}"
                    f" | {label(m['unquantized_method'])} | {_format_bytes(q['bytes_before'], unit)}"
                    f" | {_format_bytes(q['bytes_after'], unit)} | {ratio:.3f} | {m['saved_bytes_ratio']:.3f}"
                    f" | {m['counter_agreement']:.3f} | {q['num_quantized']} of {q['num_saved']}"
                    f" ({q['num_deduplicated']}) | {m['memory_ratio_unquantized']:.2f}"
                    f" | {m['step_time_ratio_unquantized']:.2f} |"
                )
        if not gpu:
            rss = "; ".join(
                f"{label(k)} {_format_bytes(m.get('rss_peak_delta_bytes'), unit)}" for k, m in model["methods"].items()
            )
            lines += ["", f"Peak RSS delta per method ({unit}, indicative: allocator reuse blurs it): {rss}."]
        where = "" if gpu else "; checked here on the small CPU models, as a proxy"
        lines += ["", f"Targets (reference targets, set for one H100{where}):", ""]
        for target in model["targets"]:
            mark = "met" if target["met"] else "NOT met"
            if not target.get("applies", True):
                mark = f"{mark.lower()}, not applicable here: GPU target"
            lines.append(f"- {target['target']}: {target['value']:.3f}x -> **{mark}**")
    cost = results["controller_cost"]
    if cost["steps"]:
        lines += [
            "",
            "## Trainable-set controller cost",
            "",
            f"Time of `TrainableSetController`'s optimizer-step boundaries (its `last_boundary`) over the"
            f" {cost['steps']} steps of the LISA (ours)"
            f" runs: {cost['mean_us']:.1f} us per step on average ({cost['mean_us_without_logging']:.1f} us without"
            f" the `pl_module.log('trainable_params', ...)` it calls when the set changes);"
            f" {_format_us(cost['mean_us_after_first'])} us per step without each run's first step (the initial"
            f" freeze and Lightning's first `log` call of the fit: {_format_us(cost['first_us'])} us, of which"
            f" {_format_us(cost['first_logging_us'])} in `log`). A step where LISA resamples costs"
            f" {_format_us(cost['change_us'])} us (of which {_format_us(cost['change_logging_us'])} in `log`), any"
            f" other step {_format_us(cost['unchanged_us'])} us: at LISA's default interval 20 that is"
            f" {_format_us(cost['projected_mean_us_at_interval_20'])} us per step.",
            "",
            "| Model | Method | Steps (set changed) | Mean per step (us) | Mean without first step (us) | First step"
            " (us) | Set changes (us) | of which `log` (us) | Set unchanged (us) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, model in results["models"].items():
            for method in ("lisa", "lisa_kept", "lisa_int8_adamw8bit"):
                if method not in model["methods"]:
                    continue
                c = model["methods"][method]["controller"]
                lines.append(
                    f"| {key} | {label(method)} | {c['steps']} ({c['steps_with_change']})"
                    f" | {_format_us(c['mean_us'])} | {_format_us(c['mean_us_after_first'])}"
                    f" | {_format_us(c['first_us'])} | {_format_us(c['change_us'])}"
                    f" | {_format_us(c['change_logging_us'])} | {_format_us(c['unchanged_us'])} |"
                )
    if not gpu:
        lines += [
            "",
            "CPU sizes are small and parameter-dominated (few activations per parameter), unlike the GPU sizes the"
            " targets were set for: methods that shrink activations gain less here, LoRA's tiny trainable set wins"
            " more, and in the small Llama the embeddings and head, which LISA always trains, are a much larger"
            " share of the parameters than in the 1.1B model. Memory here is the counted components, not an"
            " allocator peak. Activation quantization stores fp32 activations here (bf16 on GPU) in 8 bits, so its"
            " saved-bytes ratio is near a quarter rather than a half, and its CPU kernels on one thread say nothing"
            " about the GPU step-time target.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--sizes", choices=sorted(SIZES), default=None, help="model sizes (default: the mode's)")
    parser.add_argument("--tiny", action="store_true", help="shortcut for --sizes tiny (seconds; for tests)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds over the methods (default: per sizes)")
    parser.add_argument("--models", nargs="+", default=None, help="run only these model keys")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(recipes()),
        default=None,
        help="run only these methods (full FT and the unquantized runs they compare with are always added)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fuse the activation quantization with torch.compile (default: on, except for --tiny)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU, torch's on GPU)")
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results")
    parser.add_argument("--tag", default=None, help="suffix of the result files, e.g. peers -> memory_cpu_peers.*")
    args = parser.parse_args(argv)
    if args.mode == "gpu" and not torch.cuda.is_available():
        sys.exit("error: --mode gpu needs a CUDA device and torch sees none. HINT: run --mode cpu on this machine.")
    sizes = "tiny" if args.tiny else args.sizes
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one Trainer per method: keep the log short
    results = run(
        args.mode,
        sizes=sizes,
        out_dir=args.out_dir,
        repeats=args.repeats,
        models=args.models,
        threads=args.threads,
        methods=args.methods,
        compile=args.compile,
        tag=args.tag,
    )
    print(render_markdown(results))


if __name__ == "__main__":
    main()
