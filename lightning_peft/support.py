"""Check which methods work on a model, and how: the cells of the support matrix.

``check_support(build, inputs)`` runs every method of the registry (:mod:`lightning_peft.methods`) that has
something to check on a freshly built model for one or two optimizer steps (or, for early pruning, the surgery
itself) and checks what the method promises, not just that nothing crashed. Each method's probe is part of its
registry entry; the built-in ones are here:

* **LISA** — the parameters that get gradients are exactly the non-block parameters and the sampled block;
* **Half Fine-Tuning** — in every block, each category of two or more layers (attention, MLP, norms) trains part of
  its layers, about half of all block parameters train (between 30 % and 70 %: whole tensors are chosen), and
  non-block parameters train; blocks of a single layer each are split by channels;
* **IST** — with LoRA on the blocks' projections (or convolutions), only the LoRA modules of the sampled blocks get
  gradients;
* **early pruning** — the physically pruned model (heads, neurons, LoRA slices) computes what the masked model
  computes, is smaller, and still trains (and generates, for causal LMs);
* **8-bit activations** — the bytes saved for backward fall and the gradient keeps a cosine of at least 0.99 to the
  unquantized one (tensors of 1,024 elements or more quantized, as tiny models have few above the default
  threshold; the lowest per-tensor cosine is reported);
* **gradual unfreezing** — the first step trains only the head and what follows the blocks, the second adds the top
  block;
* **layer-wise LR decay** — one SGD step moves every parameter by the learning rate times ``decay ** depth`` times
  its gradient;
* **a registered method without a probe of its own** (:func:`check_trainable_set`) — one step with its callback:
  every parameter that gets a gradient is one its ``preview(model)`` names, and some do.

A method that refuses the model (a ``ValueError`` with a ``HINT``) is a *refusal*, a clear answer; anything else
that goes wrong is a *failure*. ``benchmarks/support_matrix.py`` runs this over the model zoo and writes the
README's support matrix.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_peft.layout import block_anatomy, find_blocks
from lightning_peft.layout.peft_layers import lora_adapters, lora_rank
from lightning_peft.methods import Method, get_method, methods

__all__ = [
    "CellResult",
    "check_gradual_unfreezing",
    "check_hft",
    "check_ist",
    "check_lisa",
    "check_llrd",
    "check_pruning",
    "check_quantization",
    "check_support",
    "check_trainable_set",
    "supported_methods",
]


def supported_methods() -> tuple[str, ...]:
    """The names of the registered methods the support check has something to check for, in registry order.

    Example::

        >>> supported_methods()[:5]
        ('lisa', 'hft', 'ist', 'early_pruning', 'activation_quantization')
    """
    return tuple(m.name for m in methods() if m.supported)


@dataclass
class CellResult:
    """The outcome of one method on one model.

    Attributes:
        method: the name of a registered method (:func:`supported_methods`).
        status: ``"ok"``, ``"partial"`` (works, leaves something out: ``detail`` says what), ``"refused"`` (a clear
            error with a hint) or ``"fail"`` (anything else: a bug).
        detail: what was checked, left out, or the error message.
        seconds: wall time of the check.
    """

    method: str
    status: str
    detail: str
    seconds: float = 0.0


def _loss(out: Tensor) -> Tensor:
    """A loss linear in the output along a fixed random direction.

    Its gradients are of order 1 whatever the output's scale: tiny random models can output values near 0, where a
    squared loss has no gradient worth comparing.
    """
    out = out.float()
    direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.device)
    return (out * direction).mean()


class _Probe(pl.LightningModule):
    """Trains ``net`` on one fixed batch with the loss :func:`_loss` of ``output(net(**inputs))``."""

    def __init__(self, net: nn.Module, inputs: Mapping[str, Tensor], output: Callable[[Any], Tensor]) -> None:
        super().__init__()
        self.net = net.train()  # Lightning keeps each submodule's train/eval mode: the net must arrive in training
        self.inputs = dict(inputs)
        self.output = output

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return _loss(self.output(self.net(**self.inputs)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(list(range(8)), batch_size=1)


class _Gradients(Callback):
    """Records, per optimizer step, the names of the parameters holding a non-zero gradient."""

    def __init__(self) -> None:
        self.steps: list[set[str]] = []
        self.extra: list[Any] = []
        self.watch: Callable[[], Any] | None = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        names = {n for n, p in pl_module.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        self.steps.append(names)
        self.extra.append(self.watch() if self.watch is not None else None)


def _fit(module: pl.LightningModule, callbacks: list[Callback], steps: int) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)


def _strip(name: str) -> str:
    return name[len("net.") :] if name.startswith("net.") else name


def check_lisa(build, inputs, output, causal_lm: bool = False) -> tuple[str, str]:
    """LISA's probe: the parameters that get gradients are the non-block ones and those of the sampled block."""
    from lightning_peft.callbacks import LISA

    module = _Probe(build(), inputs, output)
    lisa = LISA(n_layers=1, interval=1, seed=0, plot=False)
    grads = _Gradients()
    grads.watch = lambda: list(lisa.sampled or [])
    _fit(module, [lisa, grads], steps=2)
    stack = lisa.stack
    outside = set(stack.outside_parameter_names())
    for names, sampled in zip(grads.steps, grads.extra, strict=True):
        allowed = outside | {n for i in sampled for n in stack.block_parameter_names(i)}
        stray = sorted(names - allowed)
        if stray:
            return "fail", f"parameters outside the sampled block {sampled} got gradients: {stray[:3]}"
        if not any(stack.block_of(n) in sampled for n in names):
            return "fail", f"the sampled block {sampled} got no gradient"
    return "ok", f"{len(stack)} blocks in {len(stack.stacks)} stack(s) ({stack.source})"


def check_hft(build, inputs, output, causal_lm: bool = False) -> tuple[str, str]:
    """Half Fine-Tuning's probe: each category of a block trains part of its layers, about half of all in all."""
    from lightning_peft.callbacks import HalfFineTuning

    module = _Probe(build(), inputs, output)
    hft = HalfFineTuning(seed=0)
    grads = _Gradients()
    _fit(module, [hft, grads], steps=1)
    named = dict(module.named_parameters())
    plan = hft.plan()
    selected = set(plan.selected)
    allowed = selected | set(plan.outside)
    stray = sorted(grads.steps[0] - allowed)
    if stray:
        return "fail", f"frozen parameters got gradients: {stray[:3]}"
    if plan.channels:
        rows = [(name, mask) for name, mask in plan.masks.items() if mask.numel() > 1]
        share = sum(int(m.sum()) for _, m in rows) / max(sum(m.numel() for _, m in rows), 1)
        if not rows or not 0.3 <= share <= 0.7:
            return "fail", f"channel halves: {share:.2f} of the rows train (expected about half)"
        return "ok", f"channel halves of {len(plan.blocks)} layers (blocks hold one layer each): {share:.2f} of rows"
    whole: list[int] = []
    all_total = all_trained = 0
    for index, block in enumerate(plan.blocks):
        by_category: dict[str, list] = {}
        for unit in block:
            by_category.setdefault(unit.category, []).append(unit)
        for units in by_category.values():
            picked = sum(any(p in selected for p in unit.parameters) for unit in units)
            if len(units) >= 2 and picked in (0, len(units)) and index not in whole:
                whole.append(index)
        params = [p for unit in block for p in unit.parameters]
        all_total += sum(named[p].numel() for p in params)
        all_trained += sum(named[p].numel() for p in params if p in selected)
    if whole:
        return "fail", f"blocks {whole[:5]} train all or none of a category of two or more layers"
    share = all_trained / max(all_total, 1)
    if not 0.3 <= share <= 0.7:
        return "fail", f"{share:.2f} of the block parameters train (expected about half)"
    return "ok", f"{len(plan.blocks)} blocks halved: {share:.2f} of block parameters train"


def _lora_targets(net: nn.Module) -> list[str]:
    """Full names of the projections (or convolutions, for CNN blocks) of every block: the LoRA targets."""
    stack = find_blocks(net)
    names = {id(m): n for n, m in net.named_modules()}
    targets: list[str] = []
    for name, block in zip(stack.names, stack.blocks, strict=True):
        anatomy = block_anatomy(block, name)
        modules = [m for s in anatomy.attention for m in (s.q, s.k, s.v, s.qkv, s.o) if m is not None]
        modules += [m for s in anatomy.mlp for m in (*s.in_projs, s.down)]
        if not modules:  # no recognised site: every Linear / Conv2d, but none inside nn.MultiheadAttention, whose
            # forward reads its projections' weights directly (a LoRA wrapper there would never run)
            mha = {id(m) for a in block.modules() if isinstance(a, nn.MultiheadAttention) for m in a.modules()}
            modules = [
                m
                for m in block.modules()
                if id(m) not in mha
                and (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))  # peft: no grouped
            ]
        targets += [names[id(m)] for m in modules]
    return targets


def _with_lora(build) -> tuple[nn.Module, int]:
    from peft import LoraConfig, get_peft_model

    net = build()
    targets = _lora_targets(net)
    if not targets:
        raise ValueError("no Linear, Conv1D or Conv2d layer in the blocks to put LoRA on. HINT: use adapters.")
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return get_peft_model(net, config), len(targets)


def check_ist(build, inputs, output, causal_lm: bool = False) -> tuple[str, str]:
    """IST's probe: with LoRA on the blocks, only the LoRA modules of the sampled blocks get gradients."""
    from lightning_peft.callbacks import IST

    net, n_targets = _with_lora(build)
    module = _Probe(net, inputs, output)
    ist = IST(update_ratio=0.5, interval=1, seed=0, plot=False)
    grads = _Gradients()
    grads.watch = lambda: list(ist.sampled or [])
    _fit(module, [ist, grads], steps=2)
    stack = ist.stack
    for names, sampled in zip(grads.steps, grads.extra, strict=True):
        blocks = {stack.block_of(n) for n in names} - {None}
        if not blocks <= set(sampled):
            return "fail", f"LoRA of blocks {sorted(blocks - set(sampled))} trained, sampled {sampled}"
        if any("lora_" not in n for n in names if stack.block_of(n) is not None):
            return "fail", "a non-LoRA block parameter trained"
    return "ok", f"LoRA on {n_targets} layers, {ist.n_trained} of {len(stack)} blocks per step"


def _kept_heads(site) -> list[int]:
    group = site.group_size
    if site.num_kv_heads > 1:
        return list(range(site.num_heads - group))  # drop the last key/value group
    return list(range(site.num_heads)) if site.num_heads == 1 else list(range(1, site.num_heads))


def check_pruning(build, inputs, output, causal_lm: bool = False) -> tuple[str, str]:
    """Early pruning's probe: the pruned model computes what the masked one does, is smaller, and still trains."""
    from lightning_peft.pruning import PruningMasks, find_lora_layers, find_sites
    from lightning_peft.pruning.plan import PruningPlan, apply_pruning_plan
    from lightning_peft.pruning.verify import SiteVerifier

    try:
        net, _ = _with_lora(build)
    except ValueError:
        net = build()
    net.eval()
    sites = find_sites(net)
    lora = find_lora_layers(net)
    if not sites.attention and not sites.mlp and not lora:
        reasons = "; ".join(f"{p}: {w}" for p, w in sites.skipped[:2])
        raise ValueError(f"nothing to prune ({reasons or 'no attention, MLP or LoRA'}). HINT: see the layout registry")
    # as EarlyPruning does: a pruned copy of one block per class must compute what the masked block computes
    stack = find_blocks(net)
    verifier = SiteVerifier(stack.names, stack.blocks, sites)
    verifier.start()
    net(**inputs)  # with autograd on, as a training forward (the verifier records only those)
    verifier.stop()
    excluded = verifier.verify()
    if excluded:
        sites.attention = [s for s in sites.attention if s.path not in excluded]
        sites.mlp = [s for s in sites.mlp if s.path not in excluded]
        sites.skipped += list(excluded.items())
    plan = PruningPlan(
        heads={s.path: _kept_heads(s) for s in sites.attention if s.num_heads > 1},
        neurons={s.path: [i for i in range(s.hidden) if i % 3] for s in sites.mlp},
        lora_ranks={p: {a: [0, 2] for a in lora_adapters(layer)} for p, layer in lora.items()},
    )
    masks = PruningMasks(sites)
    with torch.no_grad():
        for site, mask in zip(masks.attention_sites, masks.heads, strict=True):
            mask.zero_()
            mask[plan.heads.get(site.path, list(range(site.num_heads)))] = 1
        for site, mask in zip(masks.mlp_sites, masks.neurons, strict=True):
            mask.zero_()
            mask[plan.neurons[site.path]] = 1
        for layer in lora.values():  # ranks 1 and 3 of every LoRA layer out: zero their rows of A
            for adapter, (lora_a, _) in lora_adapters(layer).items():
                lora_a.weight[[i for i in range(lora_rank(layer, adapter)) if i not in (0, 2)]] = 0
    before = sum(p.numel() for p in net.parameters())
    # outputs in training mode with autograd on: fused inference paths (nn.TransformerEncoderLayer's fast path) skip
    # module hooks, so the masks; the zoo's models have no dropout, so training mode is deterministic
    net.train()
    masks.install()
    expected = output(net(**inputs)).float().detach()
    masks.remove()
    apply_pruning_plan(net, plan)
    after = sum(p.numel() for p in net.parameters())
    got = output(net(**inputs)).float().detach()
    scale = expected.abs().max().clamp_min(1.0)
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-4 * float(scale), rtol=1e-4):
        diff = (got - expected).abs().max() if got.shape == expected.shape else "shape"
        return "fail", f"pruned output differs from the masked model's (max diff {diff})"
    if after >= before:
        return "fail", "the model did not get smaller"
    loss = _loss(output(net(**inputs)))
    loss.backward()
    if not torch.isfinite(loss):
        return "fail", "training after pruning gives a non-finite loss"
    if causal_lm:
        net.eval()
        ids = inputs["input_ids"]
        generated = net.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
        if generated.shape[1] != ids.shape[1] + 2:
            return "fail", "generation after pruning did not produce 2 tokens"
    parts = [f"{len(plan.heads)} attention", f"{len(plan.neurons)} MLP", f"{len(lora)} LoRA"]
    detail = f"{', '.join(parts)} sites pruned, {before} -> {after} parameters, output equal to the masked model"
    if sites.skipped:
        left = "; ".join(f"{p}: {w}" for p, w in sites.skipped[:2])
        more = f" (+{len(sites.skipped) - 2} more)" if len(sites.skipped) > 2 else ""
        return "partial", f"{detail}; left out: {left}{more}"
    return "ok", detail


def check_quantization(build, inputs, output, causal_lm: bool = False) -> tuple[str, str]:
    """8-bit activations' probe: fewer bytes saved for backward, the gradient's cosine to the exact one >= 0.99."""
    from lightning_peft.quantization import ActivationQuantizer

    def grads_of(quantize: bool) -> tuple[dict[str, Tensor], Any]:
        torch.manual_seed(0)
        net = build().train()
        quantizer = None
        if quantize:
            # tensors of 1,024+ elements: the tiny models' smaller ones (per-token statistics of 2 x 5 tokens) carry
            # so little signal that a few quantization steps swamp sums such as a bias gradient
            quantizer = ActivationQuantizer("int8", min_numel=1024)
            quantizer.attach(net)
            with quantizer.step():
                loss = _loss(output(net(**inputs)))
        else:
            loss = _loss(output(net(**inputs)))
        loss.backward()
        return {n: p.grad.detach().double() for n, p in net.named_parameters() if p.grad is not None}, quantizer

    plain, _ = grads_of(False)
    quantized, quantizer = grads_of(True)
    stats = quantizer.stats
    if stats.bytes_after >= stats.bytes_before:
        return "fail", f"saved bytes did not fall ({stats.bytes_before} -> {stats.bytes_after})"
    worst, worst_name = 1.0, ""
    largest = max((float(g.norm()) for g in plain.values()), default=0.0)
    for name, g in plain.items():
        # gradients that are zero in exact arithmetic (a key bias: softmax ignores a constant added to every score)
        # hold only rounding noise, whose direction means nothing
        if float(g.norm()) <= 1e-4 * largest or name not in quantized:
            continue
        cosine = float(torch.nn.functional.cosine_similarity(g.flatten(), quantized[name].flatten(), dim=0))
        if cosine < worst:
            worst, worst_name = cosine, name
    names = [n for n in plain if n in quantized]
    overall = float(
        torch.nn.functional.cosine_similarity(
            torch.cat([plain[n].flatten() for n in names]), torch.cat([quantized[n].flatten() for n in names]), dim=0
        )
    )
    # the whole gradient must keep its direction; single small tensors of a tiny model (batch of 2) may move more
    if overall < 0.99:
        return "fail", f"the gradient's cosine to the unquantized one is {overall:.4f} (< 0.99)"
    return "ok", (
        f"saved bytes {stats.bytes_after / stats.bytes_before:.2f}x, gradient cosine {overall:.4f}"
        f" (lowest tensor: {worst:.3f}, {worst_name})"
    )


def check_gradual_unfreezing(build, inputs, output, causal_lm: bool = False) -> tuple[str, str]:
    """Gradual unfreezing's probe: step 0 trains the head (and what follows the blocks), step 1 adds the top block."""
    from lightning_peft.callbacks import GradualUnfreezing

    module = _Probe(build(), inputs, output)
    callback = GradualUnfreezing(unfreeze_every=1, unit="steps")
    grads = _Gradients()
    _fit(module, [callback, grads], steps=2)
    groups = callback.groups
    assert groups is not None
    top, first_block = set(groups.top), set(groups.groups[1])
    stray = sorted(grads.steps[0] - top)
    if stray:
        return "fail", f"at stage 0 parameters outside the head got gradients: {[_strip(n) for n in stray[:3]]}"
    if not grads.steps[0]:
        return "fail", "the head got no gradient at stage 0"
    stray = sorted(grads.steps[1] - top - first_block)
    if stray:
        return "fail", f"at stage 1 parameters below the top block got gradients: {[_strip(n) for n in stray[:3]]}"
    if not grads.steps[1] & first_block:
        return "fail", "the top block got no gradient at stage 1"
    return "ok", f"head, then {groups.n_blocks} blocks top down ({groups.stack.source})"


def check_llrd(build, inputs, output, causal_lm: bool = False) -> tuple[str, str]:
    """Layer-wise LR decay's probe: one SGD step moves every parameter by ``lr * decay ** depth`` times its gradient."""
    from lightning_peft.callbacks import LayerwiseLRDecay

    module = _Probe(build(), inputs, output)
    callback = LayerwiseLRDecay(decay=0.5)
    plan = callback.preview(module)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    gradients: dict[str, Tensor] = {}

    class _Keep(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            gradients.update({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    _fit(module, [callback, _Keep()], steps=1)
    lr = 1e-3  # the probe's SGD
    checked = 0
    for name, param in module.named_parameters():
        grad = gradients.get(name)
        if grad is None or not bool(grad.abs().sum() > 0):
            continue
        expected = before[name] - lr * plan.factors[name] * grad
        if not torch.allclose(param.detach(), expected, rtol=1e-4, atol=1e-8):
            return "fail", f"{_strip(name)} did not move by lr * 0.5 ** {plan.depths[name]} times its gradient"
        checked += 1
    if not checked:
        return "fail", "no parameter got a gradient"
    return "ok", f"{plan.n_blocks + 2} depths, {checked} parameter tensors checked ({callback.groups.stack.source})"


def check_trainable_set(method: Method, build, inputs, output) -> tuple[str, str]:
    """The probe of a registered method without one of its own: one step with its callback.

    Every parameter that gets a gradient must be one that ``method.preview(model)`` names, and some must.
    """
    net = build()
    expected = {f"net.{n}" for n in method.preview(net)}
    module = _Probe(net, inputs, output)
    grads = _Gradients()
    callback = method.build_callback()
    _fit(module, [callback, grads], steps=1)
    trained = grads.steps[0]
    stray = sorted(trained - expected)
    if stray:
        return "fail", f"parameters {method.label} does not preview got gradients: {[_strip(n) for n in stray[:3]]}"
    if not trained:
        return "fail", "no parameter got a gradient"
    total = sum(1 for _ in module.parameters())
    return "ok", f"{len(trained)} of {total} parameter tensors trained, as previewed"


def check_support(
    build: Callable[[], nn.Module],
    inputs: Mapping[str, Tensor],
    output: Callable[[Any], Tensor] = lambda out: out,
    causal_lm: bool = False,
    methods: tuple[str, ...] | None = None,
) -> list[CellResult]:
    """Run each method on fresh models from ``build`` and check what it promises (see the module docstring).

    Args:
        build: returns a new model (same weights each call: seed inside it).
        inputs: keyword inputs of the model's forward.
        output: picks the tensor to build a loss from (``lambda out: out.logits``).
        causal_lm: the model generates (``generate``): checked after pruning.
        methods: the names of the registered methods to check (default: every one with something to check,
            :func:`supported_methods`).

    Returns:
        One :class:`CellResult` per method.

    Example::

        >>> import timm, torch
        >>> build = lambda: timm.create_model("vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=4, img_size=32)
        >>> results = check_support(build, {"x": torch.randn(2, 3, 32, 32)}, methods=("lisa",))
        >>> results[0].status, results[0].detail
        ('ok', '2 blocks in 1 stack(s) (timm group_matcher)')
    """
    known = supported_methods()
    methods = known if methods is None else tuple(methods)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(
            f"`methods` must be among {list(known)}, got {unknown}. HINT: leave it out for all, or register the"
            " method (with a callback or a probe) in lightning_peft.methods."
        )
    results = []
    for method in methods:
        start = time.perf_counter()
        try:
            status, detail = get_method(method).check(build, inputs, output, causal_lm)
        except ValueError as error:
            message = str(error).strip().splitlines()[0]
            status, detail = ("refused" if "HINT" in message else "fail"), message
        except Exception as error:  # a crash is a failure of the method on this model: report it, do not stop
            status, detail = "fail", f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
        results.append(CellResult(method, status, detail, time.perf_counter() - start))
    return results
