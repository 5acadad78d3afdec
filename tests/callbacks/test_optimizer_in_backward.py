import csv
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import ConvStack, TinyBlockModel, snapshot, trainer_kwargs
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_peft.adapters import AdapterConfig, add_adapters, mark_only_adapters_as_trainable
from lightning_peft.callbacks import (
    IST,
    LISA,
    ActivationQuantization,
    EarlyPruning,
    HalfFineTuning,
    OptimizerInBackward,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Counts(Callback):
    """Records, after every optimizer step, how OptimizerInBackward stepped the parameters."""

    def __init__(self, in_backward: OptimizerInBackward) -> None:
        self.in_backward, self.counts, self.sets = in_backward, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts.append(self.in_backward.last_step)
        self.sets.append(frozenset(n for n, p in pl_module.named_parameters() if p.requires_grad))
        self.trainer = trainer


class LiveGradients(Callback):
    """The most parameters holding a `.grad` at once, seen from post-accumulate hooks that run before any step."""

    def __init__(self) -> None:
        self.most = 0
        self.handles = []

    def setup(self, trainer, pl_module, stage):  # before OptimizerInBackward's hooks (on_train_start): runs first
        params = list(pl_module.parameters())

        def count(_):
            self.most = max(self.most, sum(p.grad is not None for p in params))

        self.handles = [p.register_post_accumulate_grad_hook(count) for p in params if p.requires_grad]

    def teardown(self, trainer, pl_module, stage):
        for handle in self.handles:
            handle.remove()


def _method(name):
    return {
        "lisa": lambda: LISA(n_layers=1, interval=2, seed=0, plot=False),
        "ist": lambda: IST(update_ratio=0.5, interval=2, seed=3, plot=False),
        "hft": lambda: HalfFineTuning(seed=2),
        "aq": lambda: ActivationQuantization(min_numel=16),
    }[name]()


class AdapterModel(TinyBlockModel):
    """Frozen blocks with a bottleneck adapter each (IST trains PEFT modules); embedding, norm and head train."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        add_adapters(self, AdapterConfig(sites={"mlp": ["fc1", "fc2"]}, bottleneck_size=4), freeze_base=False)
        mark_only_adapters_as_trainable(self, ["embed", "head"])
        self.norm.requires_grad_(True)


def _train(tmp_path, in_backward, methods=(), optimizer="adamw", model=TinyBlockModel, max_steps=6, **trainer_args):
    torch.manual_seed(0)
    module = model(optimizer=optimizer) if model is not ConvStack else model()
    callbacks = [_method(name) for name in methods]
    counts = None
    if in_backward:
        callback = OptimizerInBackward()
        counts = Counts(callback)
        callbacks += [callback, counts]
    kwargs = trainer_kwargs(tmp_path, max_steps=max_steps, **trainer_args)
    pl.Trainer(callbacks=callbacks, **kwargs).fit(module)
    return module, counts


@pytest.mark.parametrize(
    ("optimizer", "methods", "accumulate"),
    [
        ("adamw", (), 1),
        ("adamw8bit", (), 1),
        ("adamw", ("lisa",), 1),
        ("adamw8bit", ("lisa",), 1),
        ("adamw", (), 3),
        ("adamw8bit", ("lisa",), 2),
        ("adamw", ("hft", "aq"), 2),
    ],
)
def test_weights_after_n_steps_equal_a_normal_run(optimizer, methods, accumulate, tmp_path):
    reference, _ = _train(tmp_path / "a", False, methods, optimizer, accumulate_grad_batches=accumulate)
    module, counts = _train(tmp_path / "b", True, methods, optimizer, accumulate_grad_batches=accumulate)
    assert len(counts.counts) == 6 * accumulate
    stepped = [c for c in counts.counts[accumulate - 1 :: accumulate]]  # the last micro-batch of each step
    assert all(c.in_backward > 0 and c.after_backward == 0 for c in stepped)
    final = dict(module.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(final[name], param, msg=name)


def test_ist_sets_change_and_weights_equal_a_normal_run(tmp_path):
    reference, _ = _train(tmp_path / "a", False, ("ist",), model=AdapterModel)
    module, counts = _train(tmp_path / "b", True, ("ist",), model=AdapterModel)
    assert len(set(counts.sets)) > 1  # IST drew other layers
    assert all(c.in_backward > 0 and c.after_backward == 0 for c in counts.counts)
    final = dict(module.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(final[name], param, msg=name)


def test_bf16_mixed_precision_gives_the_weights_of_a_normal_run(tmp_path):
    reference, _ = _train(tmp_path / "a", False, ("lisa",), precision="bf16-mixed")
    module, counts = _train(tmp_path / "b", True, ("lisa",), precision="bf16-mixed")
    assert all(c.in_backward > 0 and c.after_backward == 0 for c in counts.counts)
    final = dict(module.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(final[name], param, msg=name)


def test_gradients_are_freed_as_soon_as_each_parameter_steps(tmp_path):
    def most_live(in_backward, methods=()):
        torch.manual_seed(0)
        live = LiveGradients()
        callbacks = [live, *(_method(name) for name in methods)] + ([OptimizerInBackward()] if in_backward else [])
        pl.Trainer(callbacks=callbacks, max_steps=4, **trainer_kwargs(tmp_path)).fit(TinyBlockModel())
        return live.most

    n_params = len(list(TinyBlockModel().parameters()))
    assert most_live(False) == n_params
    assert most_live(True) == 1  # the parameter whose gradient just completed, nothing else
    assert most_live(True, ("lisa",)) == 1


def test_lisa_releases_state_and_resampled_blocks_start_fresh(tmp_path):
    class States(Callback):
        def __init__(self, lisa):
            self.lisa, self.records = lisa, []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            optimizer = trainer.optimizers[0]
            steps = {
                n: int(optimizer.state[p]["step"]) for n, p in pl_module.named_parameters() if p in optimizer.state
            }
            self.records.append((tuple(self.lisa.sampled), steps))

    torch.manual_seed(0)
    lisa = LISA(n_layers=1, interval=2, seed=0, plot=False)
    states = States(lisa)
    pl.Trainer(callbacks=[lisa, OptimizerInBackward(), states], max_steps=8, **trainer_kwargs(tmp_path)).fit(
        TinyBlockModel()
    )
    expected: dict[str, int] = {}
    for step, (sampled, steps) in enumerate(states.records):
        blocks = {int(n.split(".")[1]) for n in steps if n.startswith("blocks.")}
        assert blocks == set(sampled), step  # the state of the unsampled blocks is released
        # a block that trains on from the previous step continues its state; one sampled again starts fresh
        expected = {n: expected.get(n, 0) + 1 for n in steps}
        assert steps == expected, step
    assert len({sampled for sampled, _ in states.records}) > 1  # LISA did resample


def test_channel_halves_keep_frozen_rows_exactly(tmp_path):
    reference, _ = _train(tmp_path / "a", False, ("hft",), model=ConvStack)
    torch.manual_seed(0)
    module = ConvStack()
    start = snapshot(module)
    hft = HalfFineTuning(seed=2)
    pl.Trainer(callbacks=[hft, OptimizerInBackward()], max_steps=6, **trainer_kwargs(tmp_path / "b")).fit(module)
    assert hft.masks  # blocks of one convolution each: channel halves (row masks)
    final = dict(module.named_parameters())
    for name, mask in hft.masks.items():
        assert torch.equal(final[name][~mask], start[name][~mask]), name  # despite weight decay 0.1
        assert not torch.equal(final[name][mask], start[name][mask]), name
    for name, param in reference.named_parameters():
        torch.testing.assert_close(final[name], param, msg=name)


def test_the_lr_scheduler_drives_every_per_parameter_step_and_loss_and_lr_are_logged(tmp_path):
    def run(path, in_backward):
        torch.manual_seed(0)
        module = TinyBlockModel(scheduler=True)  # StepLR halving the learning rate every step
        callbacks = [LearningRateMonitor(logging_interval="step")]
        callbacks += [OptimizerInBackward()] if in_backward else []
        logger = CSVLogger(path, name="run")
        trainer = pl.Trainer(
            callbacks=callbacks, max_steps=5, log_every_n_steps=1, **trainer_kwargs(path, logger=logger)
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module)
        with open(Path(logger.log_dir) / "metrics.csv") as f:
            rows = [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]
        return module, trainer, [str(w.message) for w in caught], rows

    reference, _, _, reference_rows = run(tmp_path / "a", False)
    module, trainer, caught, rows = run(tmp_path / "b", True)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**5)
    assert not [m for m in caught if "lr_scheduler" in m and "optimizer.step()" in m], caught
    assert rows == reference_rows
    assert [float(r["lr-AdamW"]) for r in rows if "lr-AdamW" in r] == pytest.approx([0.05 * 0.5**i for i in range(5)])
    assert len([r for r in rows if "train_loss" in r]) == 5
    final = dict(module.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(final[name], param, msg=name)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_matches_the_uninterrupted_run_bit_for_bit(optimizer, tmp_path):
    # 12 batches per epoch, LISA interval 5: the epoch-end checkpoint at step 12 falls in the middle of a period
    def run(path, max_epochs, ckpt_path=None, save=False):
        torch.manual_seed(0)
        module = TinyBlockModel(optimizer=optimizer)
        callbacks = [LISA(n_layers=2, interval=5, seed=7, plot=False), OptimizerInBackward()]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=path / "ckpt", save_last=True, save_top_k=0))
        kwargs = trainer_kwargs(path, enable_checkpointing=save)
        pl.Trainer(callbacks=callbacks, max_epochs=max_epochs, **kwargs).fit(module, ckpt_path=ckpt_path)
        return module

    reference = run(tmp_path / "a", 2)
    run(tmp_path / "b", 1, save=True)
    saved = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["optimizer_states"][0]["state"]  # the per-parameter state is the optimizer's, saved as usual
    resumed = run(tmp_path / "b", 2, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    final = dict(resumed.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(final[name], param, rtol=0, atol=0, msg=name)


def test_gradient_clipping_by_value_is_applied_per_parameter(tmp_path):
    reference, _ = _train(tmp_path / "a", False, gradient_clip_val=0.01, gradient_clip_algorithm="value")
    module, counts = _train(tmp_path / "b", True, gradient_clip_val=0.01, gradient_clip_algorithm="value")
    assert counts.trainer.gradient_clip_val == 0.01  # held while training (Lightning's clipping finds no gradient)
    unclipped, _ = _train(tmp_path / "c", False)
    final = dict(module.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(final[name], param, msg=name)
    assert not torch.equal(final["head.weight"], dict(unclipped.named_parameters())["head.weight"])


def test_hooks_and_the_optimizers_step_are_restored_after_fit(tmp_path):
    torch.manual_seed(0)
    module = TinyBlockModel()
    callback = OptimizerInBackward()
    trainer = pl.Trainer(callbacks=[callback], max_steps=2, **trainer_kwargs(tmp_path))
    trainer.fit(module)
    optimizer = trainer.optimizers[0]
    assert "step" not in vars(optimizer)  # the class's own step again
    before = snapshot(module)
    module(torch.randn(2, 6)).sum().backward()  # no step in backward any more
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())
    assert all(p.grad is not None for p in module.parameters())


class ManualModel(TinyBlockModel):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


class LBFGSModel(TinyBlockModel):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters())


class OverriddenAdamW8bit(TinyBlockModel):
    def configure_optimizers(self):
        import bitsandbytes as bnb

        manager = bnb.optim.GlobalOptimManager.get_instance()
        manager.override_config(self.head.weight, "optim_bits", 32)
        return bnb.optim.AdamW8bit(self.parameters(), lr=0.05, min_8bit_size=16)


class ClippingModel(TinyBlockModel):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        nn.utils.clip_grad_norm_(self.parameters(), 1.0)


@pytest.mark.parametrize(
    ("model", "trainer_args", "callbacks", "match"),
    [
        (TinyBlockModel, {"gradient_clip_val": 1.0}, (), r"cannot clip by global norm.*`gradient_clip_val=1.0`.*HINT"),
        (LBFGSModel, {}, (), r"cannot step `LBFGS` per parameter.*HINT: use a per-parameter optimizer"),
        (ManualModel, {}, (), r"needs automatic optimization.*`automatic_optimization=False`.*HINT"),
        (ClippingModel, {}, (), r"overrides `configure_gradient_clipping`.*HINT"),
        (OverriddenAdamW8bit, {}, (), r"cannot step `AdamW8bit` per parameter with bitsandbytes' per-parameter"),
        (TinyBlockModel, {}, (EarlyPruning,), r"cannot run with EarlyPruning.*HINT"),
        (
            TinyBlockModel,
            {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]},
            (),
            r"gradient scaler.*HINT: use `precision='bf16-mixed'`",
        ),
    ],
)
def test_what_cannot_be_correct_is_refused_when_training_starts(model, trainer_args, callbacks, match, tmp_path):
    extra = [callback() for callback in callbacks]
    trainer = pl.Trainer(
        callbacks=[OptimizerInBackward(), *extra], max_steps=1, **trainer_kwargs(tmp_path, **trainer_args)
    )
    try:
        with pytest.raises(ValueError, match=match):
            trainer.fit(model())
    finally:
        import bitsandbytes as bnb

        manager = bnb.optim.GlobalOptimManager.get_instance()  # a process-wide singleton: leave it empty
        manager.pid2config.clear()
        manager.index2config.clear()


@pytest.mark.parametrize(
    ("strategy", "name"),
    [
        ("ddp_spawn", "DDPStrategy"),
        ("ddp", "DDPStrategy"),
        (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), "ModelParallelStrategy"),
    ],
)
def test_multi_device_strategies_are_refused(strategy, name, tmp_path):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, strategy=strategy, devices=2))
    with pytest.raises(ValueError, match=rf"runs on one device; got `strategy={name}`.*averaged.*HINT: train on one"):
        OptimizerInBackward().setup(trainer, TinyBlockModel(), "fit")


def test_the_same_callback_serves_consecutive_fits(tmp_path):
    torch.manual_seed(0)
    reference = TinyBlockModel()
    module = TinyBlockModel()
    module.load_state_dict(reference.state_dict())
    callback = OptimizerInBackward()
    for run in range(2):
        pl.Trainer(max_steps=3, **trainer_kwargs(tmp_path / f"a{run}")).fit(reference)
        pl.Trainer(callbacks=[callback], max_steps=3, **trainer_kwargs(tmp_path / f"b{run}")).fit(module)
        assert callback.last_step.in_backward == len(list(module.parameters()))
    final = dict(module.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(final[name], param, msg=name)


def test_code_that_reads_gradients_after_backward_is_warned(tmp_path):
    class GradNorm(TinyBlockModel):
        def on_before_optimizer_step(self, optimizer):
            self.log("grad_norm", sum(p.grad.norm() for p in self.parameters() if p.grad is not None))

    trainer = pl.Trainer(callbacks=[OptimizerInBackward()], max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.warns(UserWarning, match=r"GradNorm override\(s\).*sees None.*HINT"):
        trainer.fit(GradNorm())


class SharedInSegments(TinyBlockModel):
    """One block applied in two reentrant-checkpointed segments: its gradient completes once per segment."""

    def forward(self, x):
        h = self.embed(x)
        h = checkpoint(self.blocks[0], h, use_reentrant=True)
        h = checkpoint(self.blocks[0], h, use_reentrant=True)
        return self.head(self.norm(h))


def test_a_gradient_completed_twice_in_one_backward_is_refused(tmp_path):
    trainer = pl.Trainer(callbacks=[OptimizerInBackward()], max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises(RuntimeError, match=r"gradient of 'blocks.0.*completed twice.*HINT: use.*use_reentrant=False"):
        trainer.fit(SharedInSegments())


def test_the_order_of_the_callbacks_does_not_matter(tmp_path):
    def run(path, reverse):
        torch.manual_seed(0)
        module = ConvStack()  # blocks of one convolution each: Half Fine-Tuning's channel halves
        callbacks = [
            OptimizerInBackward(),
            LISA(n_layers=2, interval=2, seed=1, plot=False),
            HalfFineTuning(reselect_every_n_epochs=1, seed=2),
            ActivationQuantization(min_numel=64),
        ]
        trainer = pl.Trainer(callbacks=callbacks[::-1] if reverse else callbacks, max_epochs=2, **trainer_kwargs(path))
        trainer.fit(module)
        return snapshot(module)

    first, second = run(tmp_path / "a", False), run(tmp_path / "b", True)
    assert all(torch.equal(first[name], second[name]) for name in first)
