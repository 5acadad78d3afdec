"""GPU checks: run wherever CUDA is available (skipped on CPU-only machines such as CI)."""

import lightning.pytorch as pl
import pytest
import timm
import torch
from helpers import trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft.callbacks import LISA, ActivationQuantization

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class ViTModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = timm.create_model("vit_small_patch16_224", depth=8, num_classes=10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 3, 224, 224, generator=g), torch.randint(0, 10, (64,), generator=g))
        return DataLoader(data, batch_size=16)


class PeakMemory(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def on_train_end(self, trainer, pl_module):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()


def _peak(tmp_path, callbacks):
    torch.manual_seed(0)
    peak = PeakMemory()
    kw = trainer_kwargs(tmp_path, accelerator="gpu", precision="bf16-mixed", max_steps=4)
    pl.Trainer(callbacks=[*callbacks, peak], **kw).fit(ViTModule())
    torch.cuda.empty_cache()
    return peak.peak


def test_lisa_and_int8_activations_lower_the_gpu_peak(tmp_path):
    full = _peak(tmp_path / "full", [])
    lisa = _peak(tmp_path / "lisa", [LISA(n_layers=2, interval=2, seed=0)])
    quantized = _peak(tmp_path / "q", [ActivationQuantization(format="int8")])
    assert lisa < 0.9 * full
    assert quantized < 0.9 * full


@pytest.mark.parametrize("compile", [False, True])
def test_int8_activations_halve_saved_bytes_under_bf16(tmp_path, compile):
    callback = ActivationQuantization(format="int8", compile=compile)
    kw = trainer_kwargs(tmp_path, accelerator="gpu", precision="bf16-mixed", max_steps=2)
    pl.Trainer(callbacks=[callback], **kw).fit(ViTModule())
    stats = callback.last_stats
    assert stats.bytes_after <= 0.55 * stats.bytes_before


def test_fsdp2_on_one_gpu_trains_and_resumes_exactly(tmp_path):
    """FSDP2 over one CUDA device (a mesh of one): DTensor parameters on CUDA, NCCL, compiled 8-bit kernels."""
    from fsdp2_script import ShardedViT, full, loader
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_peft.callbacks import HalfFineTuning

    def fit(max_steps, resume):
        module = ShardedViT()
        quantization = ActivationQuantization(min_numel=1024)
        callbacks = [
            LISA(n_layers=2, interval=2, seed=1),
            HalfFineTuning(seed=2, reset="on_train_end"),
            quantization,
            ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0),
        ]
        trainer = pl.Trainer(
            strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
            callbacks=callbacks,
            **trainer_kwargs(
                tmp_path, accelerator="gpu", precision="bf16-mixed", max_steps=max_steps, enable_checkpointing=True
            ),
        )
        trainer.fit(module, loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt" if resume else None)
        assert quantization.last_stats.num_quantized > 10
        return {name: full(param).cpu() for name, param in module.named_parameters()}

    uninterrupted = fit(10, resume=False)
    fit(8, resume=False)  # one epoch: 64 images in batches of 8
    resumed = fit(10, resume=True)
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(resumed[name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_recomputed_weight_copies_are_exact_and_free_memory_on_gpu():
    """Autocast's bf16 weight copies cast again in backward: the same gradients bit for bit, and not held."""
    from lightning_peft.quantization import ActivationQuantizer

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", depth=8, num_classes=10).cuda()
    x = torch.randn(8, 3, 224, 224, device="cuda")

    def step(quantizer):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if quantizer is None:
                loss = model(x).float().square().mean()
            else:
                with quantizer.step():
                    loss = model(x).float().square().mean()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before  # what the graph holds for backward
        loss.backward()
        return held, [p.grad.clone() for p in model.parameters()]

    plain_held, plain = step(None)
    # nothing quantized: only the weight copies are treated
    recast = ActivationQuantizer(min_numel=1 << 62)
    recast.attach(model)
    recast_held, grads = step(recast)
    assert all(torch.equal(a, b) for a, b in zip(plain, grads, strict=True))
    assert recast.stats.num_recomputed > 0 and recast.stats.bytes_weight_copies == 0
    weights_bf16 = sum(p.numel() * 2 for p in model.parameters() if p.dim() == 2)
    assert plain_held - recast_held >= 0.9 * weights_bf16
