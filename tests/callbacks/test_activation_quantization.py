import logging
import os

import lightning.pytorch as pl
import pytest
import timm
import torch
from helpers import retry_spawn_teardown_abort
from lightning.pytorch.callbacks import Callback
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft.callbacks.activation_quantization import ActivationQuantization
from lightning_peft.quantization import formats


def _data(n=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


class TinyViT(pl.LightningModule):
    """timm's ViT-Tiny at 32x32 pixels, patch 8, two blocks; records gradients and what validation saw."""

    def __init__(self, optimizer="sgd", checkpointing=False, weights_dir=None):
        super().__init__()
        torch.manual_seed(0)
        self.model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10
        )
        self.optimizer = optimizer
        self.checkpointing = checkpointing
        self.weights_dir = weights_dir
        self.grads = []
        self.saved_during_validation = []
        self.block_calls = 0
        for block in self.model.blocks:
            block.register_forward_pre_hook(self._count_block_call)

    def _count_block_call(self, module, args):
        self.block_calls += 1

    def forward(self, x):
        model = self.model
        x = model.patch_embed(x)
        x = model._pos_embed(x)
        for block in model.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
        return model.forward_head(model.norm(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        callback = next(c for c in self.trainer.callbacks if isinstance(c, ActivationQuantization))
        before = callback.quantizer.stats.num_saved
        with torch.enable_grad():  # a forward that saves tensors, in validation
            x = batch[0].requires_grad_()
            self(x).sum()
        self.saved_during_validation.append(
            (callback.quantizer.hooks_active, callback.quantizer.stats.num_saved - before)
        )

    def on_after_backward(self):
        self.grads.append({n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None})

    def configure_optimizers(self):
        if self.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_train_end(self):
        if self.weights_dir is not None:
            flat = torch.cat([p.detach().flatten() for p in self.parameters()])
            torch.save(flat, os.path.join(self.weights_dir, f"rank{self.global_rank}.pt"))


def _trainer(tmp_path, callbacks=(), **kwargs):
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


def _min_cosine(reference, other):
    cosines = {}
    for name, grad in reference.items():
        if grad.norm() > 0:
            cosines[name] = torch.nn.functional.cosine_similarity(
                grad.flatten().float(), other[name].flatten().float(), dim=0
            ).item()
    return min(cosines.values())


@pytest.mark.parametrize(("format", "threshold"), [("int8", 0.99), ("fp8_e4m3", 0.99), ("fp8_e5m2", 0.98)])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradients_match_unquantized(tmp_path, format, threshold, precision):
    reference = TinyViT()
    _trainer(tmp_path, precision=precision).fit(reference, _data())
    quantized = TinyViT()
    callback = ActivationQuantization(format=format, min_numel=1024)
    _trainer(tmp_path, [callback], precision=precision).fit(quantized, _data())
    stats = callback.last_stats
    assert stats.num_quantized > 10
    # 8 bits of fp32 activations are a quarter; of bf16 ones a half (autocast's weight copies are cast again in
    # backward, not kept)
    assert stats.bytes_after < (0.3 if precision == "32-true" else 0.55) * stats.bytes_before
    assert _min_cosine(reference.grads[0], quantized.grads[0]) >= threshold
    assert quantized.grads[0].keys() == reference.grads[0].keys()
    # hooks are gone after fit
    assert not callback.quantizer.hooks_active


def test_compiled_kernels_give_the_eager_gradients_in_training(tmp_path, monkeypatch):
    """``compile=True`` in a bf16 training step: the fused kernels round as the eager ones (one step, same batch)."""
    # the tiny model's tensors are far below the size from which compile=True uses the fused kernels
    monkeypatch.setattr(formats, "COMPILE_MIN_NUMEL", 0)
    grads = []
    for compile in (False, True):
        model = TinyViT()
        callback = ActivationQuantization(min_numel=1024, compile=compile)
        _trainer(tmp_path, [callback], precision="bf16-mixed").fit(model, _data())
        assert callback.last_stats.num_quantized > 10
        grads.append(model.grads[0])
    assert _min_cosine(grads[0], grads[1]) >= 0.999


def test_logs_bytes_and_leaves_validation_alone(tmp_path):
    model = TinyViT()
    callback = ActivationQuantization(min_numel=1024)
    trainer = _trainer(
        tmp_path, [callback], max_steps=2, limit_val_batches=1, val_check_interval=1, log_every_n_steps=1
    )
    trainer.fit(model, _data(), _data(8, seed=1))
    metrics = trainer.callback_metrics
    assert metrics["activation_quantization/bytes_after"] < 0.5 * metrics["activation_quantization/bytes_before"]
    assert metrics["activation_quantization/bytes_after"] == callback.last_stats.bytes_after
    # validation ran (sanity check + after each step) and saw neither active hooks nor any pack call
    assert len(model.saved_during_validation) >= 3
    assert all(saved == (False, 0) for saved in model.saved_during_validation)


class Boom(Callback):
    def on_before_backward(self, trainer, pl_module, loss):
        raise RuntimeError("boom")


def test_hooks_are_removed_when_a_step_fails(tmp_path):
    callback = ActivationQuantization(min_numel=1024)
    # Boom runs before our on_before_backward: the step dies with the hooks active
    trainer = _trainer(tmp_path, [Boom(), callback])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(TinyViT(), _data())
    assert not callback.quantizer.hooks_active
    x = torch.randn(64, 64, requires_grad=True)
    before = callback.quantizer.stats.num_saved
    x.exp().sum()
    assert callback.quantizer.stats.num_saved == before


def test_activation_checkpointing_stays_effective(tmp_path):
    plain, checkpointed = TinyViT(), TinyViT(checkpointing=True)
    plain_callback, checkpointed_callback = (ActivationQuantization(min_numel=1024) for _ in range(2))
    _trainer(tmp_path, [plain_callback]).fit(plain, _data())
    _trainer(tmp_path, [checkpointed_callback]).fit(checkpointed, _data())
    # what the graph keeps through our hooks: with checkpointing, the blocks' insides are not among it
    assert checkpointed_callback.last_stats.num_saved < 0.5 * plain_callback.last_stats.num_saved
    assert checkpointed_callback.last_stats.bytes_after < 0.5 * plain_callback.last_stats.bytes_after
    # both blocks ran twice (forward and recomputation in backward); gradients agree
    assert checkpointed.block_calls == 2 * plain.block_calls
    assert _min_cosine(plain.grads[0], checkpointed.grads[0]) >= 0.99


def test_trains_with_bitsandbytes_adamw8bit(tmp_path):
    model = TinyViT(optimizer="adamw8bit")
    start = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(tmp_path, [ActivationQuantization(min_numel=1024)], max_steps=2, precision="bf16-mixed")
    trainer.fit(model, _data())
    optimizer = trainer.optimizers[0]
    states = [s for s in optimizer.state.values() if "state1" in s]
    assert states and any(s["state1"].dtype == torch.uint8 for s in states)  # really 8-bit optimizer state
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(not torch.equal(a, b) for a, b in zip(start, model.parameters(), strict=True)) > 10


def test_combines_with_lisa_and_adamw8bit(tmp_path):
    from lightning_peft.callbacks import LISA

    class Probe(Callback):
        frozen_shapes = []

        def on_before_backward(self, trainer, pl_module, loss):
            self.frozen_shapes.append(set(callback.quantizer._frozen_shapes))

    model = TinyViT(optimizer="adamw8bit")
    callback = ActivationQuantization(min_numel=1024)
    lisa = LISA(n_layers=1, interval=1, seed=0, plot=False)
    trainer = _trainer(tmp_path, [callback, lisa, Probe()], max_steps=2, precision="bf16-mixed")
    trainer.fit(model, _data())
    frozen = [i for i in range(2) if i not in lisa.sampled]
    assert len(frozen) == 1
    # the quantizer saw the frozen block's weights (whose bf16 copies have no grad_fn) in every step, even though
    # LISA's hooks run after its own
    block_shapes = {p.shape for p in model.model.blocks[frozen[0]].parameters()}
    assert len(Probe.frozen_shapes) == 2 and all(block_shapes <= shapes for shapes in Probe.frozen_shapes)
    assert callback.last_stats.num_quantized > 10
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.grad is None for p in model.model.blocks[frozen[0]].parameters())


@retry_spawn_teardown_abort
def test_ddp_spawn_keeps_ranks_identical(tmp_path):
    model = TinyViT(weights_dir=str(tmp_path))
    trainer = _trainer(
        tmp_path,
        [ActivationQuantization(min_numel=1024)],
        strategy="ddp_spawn",
        devices=2,
        max_steps=2,
    )
    trainer.fit(model, _data())
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(rank0, rank1)
    initial = torch.cat([p.detach().flatten() for p in TinyViT().parameters()])
    assert not torch.equal(rank0, initial)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"format": "int4"}, r"`format` must be one of 'int8', 'fp8_e4m3', 'fp8_e5m2', got 'int4'.*HINT"),
        ({"group_size": -8}, r"`group_size` must be an integer >= 1, got -8.*HINT"),
        ({"min_numel": -1}, r"`min_numel` must be an integer >= 0, got -1.*HINT"),
        ({"group_size": True}, r"`group_size` must be an integer >= 1, got True"),
        ({"stochastic_rounding": 1}, r"`stochastic_rounding` must be True or False, got 1"),
        ({"compile": "yes"}, r"`compile` must be True or False, got 'yes'"),
        ({"log_bytes": "no"}, r"`log_bytes` must be True or False, got 'no'.*HINT"),
    ],
)
def test_misconfiguration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActivationQuantization(**kwargs)


def test_unknown_excluded_module_fails_at_setup(tmp_path):
    trainer = _trainer(tmp_path, [ActivationQuantization(exclude_modules=["model.decoder"])])
    with pytest.raises(ValueError, match=r"`exclude_modules` pattern 'model\.decoder' matches no module.*HINT"):
        trainer.fit(TinyViT(), _data())


class TwoForwardsManual(pl.LightningModule):
    """Manual optimization with two forward / backward pairs in one training step."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 2))
        self.saved_per_forward = []

    def training_step(self, batch, batch_idx):
        callback = next(c for c in self.trainer.callbacks if isinstance(c, ActivationQuantization))
        optimizer = self.optimizers()
        for _ in range(2):
            before = callback.quantizer.stats.num_quantized
            loss = self.net(batch[0]).square().mean()
            self.saved_per_forward.append(callback.quantizer.stats.num_quantized - before)
            self.manual_backward(loss)
            assert callback.quantizer.hooks_active  # re-entered after each backward
        optimizer.step()
        optimizer.zero_grad()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_manual_optimization_quantizes_every_forward(tmp_path):
    model = TwoForwardsManual()
    data = DataLoader(TensorDataset(torch.randn(64, 64)), batch_size=32)
    callback = ActivationQuantization(min_numel=1024)
    _trainer(tmp_path, [callback], max_steps=2).fit(model, data)
    # each forward: the batch (input of the first Linear), the GELU input and the GELU output
    assert model.saved_per_forward == [3, 3, 3, 3]
    assert not callback.quantizer.hooks_active


def test_built_from_cli_arguments():
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(
        TinyViT,
        args=[
            "--trainer.callbacks+=lightning_peft.callbacks.activation_quantization.ActivationQuantization",
            "--trainer.callbacks.format=fp8_e4m3",
            "--trainer.callbacks.group_size=32",
            "--trainer.logger=false",
        ],
        run=False,
        save_config_callback=None,
    )
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ActivationQuantization))
    assert (callback.quantizer.format, callback.quantizer.group_size) == ("fp8_e4m3", 32)


def test_recast_weight_copies_leave_bf16_training_exact(tmp_path, caplog):
    """Nothing quantized (min_numel above every tensor): only autocast's weight copies are treated, cast again in
    backward instead of kept, and the gradients of a bf16 training step are the plain ones, bit for bit."""
    reference = TinyViT()
    _trainer(tmp_path, precision="bf16-mixed").fit(reference, _data())
    recast = TinyViT()
    callback = ActivationQuantization(min_numel=1 << 62)
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, [callback], precision="bf16-mixed").fit(recast, _data())
    assert reference.grads[0].keys() == recast.grads[0].keys()
    assert all(torch.equal(reference.grads[0][n], recast.grads[0][n]) for n in reference.grads[0])
    stats = callback.last_stats
    assert stats.num_quantized == 0 and stats.num_recomputed > 0 and stats.bytes_weight_copies == 0
    assert stats.bytes_after < stats.bytes_before
    assert f"{stats.num_recomputed} weight copies cast again in backward" in caplog.text
