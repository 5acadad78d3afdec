"""Train with GradualUnfreezing and / or LayerwiseLRDecay on 2 CPU processes (gloo): DDP or FSDP2.

Run by tests/callbacks/test_gradual_unfreezing.py and test_layerwise_lr_decay.py as
``python unfreezing_script.py STRATEGY SCENARIO OUT_DIR MAX_STEPS [RESUME]``; Lightning relaunches it once per rank,
as a user's script with ``strategy="ddp"`` is. Nothing sets ``find_unused_parameters``. Each rank writes
``OUT_DIR/[resumed_]rank{N}.pt``: the gathered final weights, per step the trainable parameter names and each
parameter's learning rate (that of its param group).

STRATEGY: ``ddp`` (a TinyBlockModel) or ``fsdp2`` (the tiny timm ViT of fsdp2_script.py, blocks sharded).
SCENARIO: ``gu`` (GradualUnfreezing every 2 steps), ``llrd`` (LayerwiseLRDecay 0.5 under a LambdaLR warm-up) or
``both``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from fsdp2_script import ShardedViT, full, loader
from helpers import TinyBlockModel, make_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_peft.callbacks import GradualUnfreezing, LayerwiseLRDecay


def _schedule(step: int) -> float:
    return min(1.0, (step + 1) / 3)


class ScheduledTiny(TinyBlockModel):
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ScheduledViT(ShardedViT):
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Recorder(pl.Callback):
    """Per step: which parameters train and each parameter's learning rate."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        self.steps.append(
            {
                "trainable": sorted(n for n, p in pl_module.named_parameters() if p.requires_grad),
                "lr": {n: float(lr_of[id(p)]) for n, p in pl_module.named_parameters()},
            }
        )


def main(strategy: str, scenario: str, out: Path, max_steps: int, resume: bool = False) -> None:
    methods = []
    if scenario in ("gu", "both"):
        methods.append(GradualUnfreezing(unfreeze_every=2, unit="steps"))
    if scenario in ("llrd", "both"):
        methods.append(LayerwiseLRDecay(decay=0.5))
    if strategy == "ddp":
        module, data, kwargs = ScheduledTiny(), make_loader(), {"strategy": "ddp"}
    else:
        module, data = ScheduledViT(), loader()
        kwargs = {"strategy": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)}
    recorder = Recorder()
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        callbacks=[*methods, recorder, checkpoints],
        max_steps=max_steps,
        default_root_dir=out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(module, data, ckpt_path=out / "checkpoints" / "last.ckpt" if resume else None)
    final = {n: full(p) for n, p in module.named_parameters()}
    torch.save(
        {"final": final, "steps": recorder.steps},
        out / f"{'resumed_' if resume else ''}rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(
        sys.argv[1],
        sys.argv[2],
        Path(sys.argv[3]),
        int(sys.argv[4]),
        bool(int(sys.argv[5])) if len(sys.argv) > 5 else False,
    )
