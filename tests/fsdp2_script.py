"""Train a tiny timm ViT under FSDP2 (``ModelParallelStrategy`` + ``fully_shard``) on 2 CPU processes.

Run by tests/test_model_parallel.py as ``python fsdp2_script.py SCENARIO OUT_DIR``; Lightning relaunches it once
per rank. Each rank writes ``OUT_DIR/rank{N}.pt``: the gathered weights before and after training, and per step
which parameters were trainable, which changed, which had optimizer state, and the quantizer's statistics.

Scenarios:
    compose: LISA + HalfFineTuning (Half-Reset at the end) + the ActivationQuantization callback, bf16 autocast.
    ist_plugin: IST over Houlsby adapters + the ActivationQuantizedPrecision plugin.
    plain: no method (the reference for how closely FSDP2 ranks agree on CPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import timm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft.adapters import AdapterConfig, add_adapters
from lightning_peft.callbacks import IST, LISA, ActivationQuantization, HalfFineTuning
from lightning_peft.plugins import ActivationQuantizedPrecision


def full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter, on every rank."""
    tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
    return tensor.detach().clone()


class ShardedViT(pl.LightningModule):
    def __init__(self, adapters: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4, num_classes=10
        )
        if adapters:
            add_adapters(self.model, AdapterConfig(layout="houlsby", bottleneck_size=8, modules_to_save=["head"]))

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)


class Recorder(pl.Callback):
    """Per step: trainable, changed and optimizer-state parameter names; the quantizer's statistics."""

    def __init__(self, quantizer_owner) -> None:
        self.quantizer_owner = quantizer_owner
        self.steps: list[dict] = []
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        self.initial = {n: full(p) for n, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = {n: full(p) for n, p in pl_module.named_parameters()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.trainable = sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)
        self.with_grad = sorted(n for n, p in pl_module.named_parameters() if p.grad is not None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        stats = self.quantizer_owner.last_stats if self.quantizer_owner is not None else None
        self.steps.append(
            {
                "trainable": self.trainable,
                "with_grad": self.with_grad,
                "changed": sorted(
                    n for n, p in pl_module.named_parameters() if not torch.equal(full(p), self.before[n])
                ),
                "state": sorted(names[id(p)] for p in trainer.optimizers[0].state if id(p) in names),
                "stats": None if stats is None else vars(stats).copy(),
            }
        )


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
    return DataLoader(data, batch_size=8)


def main(scenario: str, out: Path, max_steps: int = 6, resume: bool = False) -> None:
    plugins, precision = None, "bf16-mixed"
    extra: dict = {}
    if scenario == "compose":
        lisa = LISA(n_layers=2, interval=2, seed=1)
        hft = HalfFineTuning(seed=2, reset="on_train_end")
        owner = ActivationQuantization(min_numel=1024)
        methods = [lisa, hft, owner]
        module = ShardedViT()
    elif scenario == "ist_plugin":
        ist = IST(interval=2, seed=3)
        owner = ActivationQuantizedPrecision("bf16-mixed", min_numel=1024)
        methods, plugins, precision = [ist], [owner], None
        module = ShardedViT(adapters=True)
    elif scenario == "plain":
        owner, methods, module = None, [], ShardedViT()
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    recorder = Recorder(owner)
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        precision=precision,
        plugins=plugins,
        callbacks=[*methods, recorder, checkpoints],
        max_steps=max_steps,
        default_root_dir=out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader(), ckpt_path=out / "checkpoints" / "last.ckpt" if resume else None)
    if scenario == "compose":
        extra = {"lisa_history": lisa.history, "hft_frozen": hft.frozen_parameter_names()}
    elif scenario == "ist_plugin":
        extra = {"ist_peft_params": [sorted(names) for names in ist._peft_params]}
    final = {n: full(p) for n, p in module.named_parameters()}
    torch.save(
        {"initial": recorder.initial, "final": final, "steps": recorder.steps, **extra},
        out / f"{'resumed_' if resume else ''}rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), *(int(arg) for arg in sys.argv[3:]))
