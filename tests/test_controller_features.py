"""The methods that change the trainable set, beside the Lightning features a user already has.

A method is a row (LISA, Half Fine-Tuning, IST over peft LoRA, LISA with Half Fine-Tuning), a feature a column. Each
cell trains a tiny model and checks, at every optimizer step, what the method promises -- exactly the block
parameters its set allows (among those nobody else froze) require grad, every block that trains changes, no other
block parameter changes -- and what the feature promises (clipped gradients, averaged weights, a second param group,
pruned weights, ...).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import Block, make_loader, trainer_kwargs
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    BatchSizeFinder,
    Callback,
    GradientAccumulationScheduler,
    LearningRateFinder,
    ModelPruning,
    OnExceptionCheckpoint,
    StochasticWeightAveraging,
)
from lightning.pytorch.callbacks.weight_averaging import EMAWeightAveraging
from torch import nn

from lightning_peft.callbacks import IST, LISA, HalfFineTuning
from lightning_peft.trainable import TrainableSetController

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 0.05


class Net(nn.Module):
    def __init__(self, lora: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(Block(8) for _ in range(4))
        self.head = nn.Linear(8, 3)
        if lora:  # peft freezes everything but the LoRA matrices; embedding and head train as well
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(r=2, target_modules=["fc1", "fc2"]), self)
            self.embed.requires_grad_(True)
            self.head.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class Module(pl.LightningModule):
    """`self.model` holds the blocks; each option switches on what a feature needs from the user's module."""

    def __init__(
        self,
        lora: bool = False,
        compile: bool = False,
        manual: bool = False,
        optimizer: str = "adamw",
        groups: bool = False,
        scheduler: bool = False,
        freeze_block0: bool = False,
        fail_at: int | None = None,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Net(lora)
        if freeze_block0:
            self.model.blocks[0].requires_grad_(False)
            self.model.head.bias.requires_grad_(False)
        self.compile, self.optimizer_name, self.groups, self.scheduler = compile, optimizer, groups, scheduler
        self.automatic_optimization = not manual
        self.fail_at = fail_at
        self.lr = LR
        self.batch_size = 4
        self.autocast: list[bool] = []
        self.validation_steps = 0

    @property
    def backbone(self) -> nn.Module:  # what BackboneFinetuning freezes and unfreezes
        return self.model.blocks

    def configure_model(self) -> None:
        if self.compile:  # as Lightning's documentation shows it
            self.model = torch.compile(self.model, backend="aot_eager")

    def compute_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return nn.functional.cross_entropy(self.model(x).float(), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("the user's code failed")
        loss = self.compute_loss(batch)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_steps += 1
        self.log("val_loss", self.compute_loss(batch))

    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self.groups:
            in_blocks = {id(p) for p in self.model.blocks.parameters()}
            params: Any = [
                {"params": [p for p in trainable if id(p) in in_blocks], "lr": self.lr},
                {"params": [p for p in trainable if id(p) not in in_blocks], "lr": self.lr / 2},
            ]
        else:
            params = trainable
        if self.optimizer_name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        else:
            optimizer = torch.optim.AdamW(params, lr=self.lr)
        if not self.scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self) -> Any:
        return make_loader(batch_size=self.batch_size)

    def val_dataloader(self) -> Any:
        return make_loader(n=8)


# ---------------------------------------------------------------------------------------------------- methods

METHODS = {
    "lisa": lambda: [LISA(n_layers=1, interval=2, seed=0, plot=False)],
    "half_finetuning": lambda: [HalfFineTuning(seed=0)],
    "ist_lora": lambda: [IST(interval=3, seed=0, plot=False)],
    "lisa+half_finetuning": lambda: [LISA(n_layers=2, interval=2, seed=0, plot=False), HalfFineTuning(seed=0)],
}


def _permitted(methods: list[Callback], controller: TrainableSetController, blocks: nn.ModuleList) -> set[int]:
    """Identities of the block parameters the methods' current sets let train."""
    ids = {id(p) for p in blocks.parameters()}
    for method in methods:
        if isinstance(method, LISA):
            ids &= {id(p) for i in method.sampled for p in blocks[i].parameters()}
        elif isinstance(method, HalfFineTuning):
            ids &= {id(controller.parameter(name)) for name in method.selected}
        elif isinstance(method, IST):  # IST decides for the PEFT parameters only
            ids -= {
                id(p)
                for i, block in enumerate(blocks)
                if i not in method.sampled
                for name, p in block.named_parameters()
                if ".lora_" in name
            }
    return ids


@dataclass
class Step:
    step: int
    stepped: bool  # an optimizer step ran in this batch (not an accumulation micro-batch)
    trainable: set[int]  # block parameters with requires_grad
    expected: set[int]  # block parameters the methods allow, among the candidates
    moved: set[int]  # block parameters this batch changed
    with_state: set[int]  # block parameters with optimizer state
    block_of: dict[int, int] = field(repr=False)

    def blocks(self, ids: set[int]) -> set[int]:
        return {self.block_of[i] for i in ids}


class Recorder(Callback):
    """What each batch trained and changed, and the gradient the optimizer stepped with."""

    def __init__(self, methods: list[Callback]) -> None:
        self.methods, self.steps, self.grad_norms, self.grad_max = methods, [], [], []
        self._handles: list[Any] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if grads:
                self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
                self.grad_max.append(max(float(g.abs().max()) for g in grads))

        self._handles = [opt.register_step_pre_hook(record) for opt in trainer.optimizers]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self._step = trainer.global_step
        self._before = {id(p): p.detach().clone() for p in pl_module.parameters()}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Module, out: Any, batch: Any, i: int) -> None:
        controller = TrainableSetController.of(trainer)
        blocks = pl_module.model.blocks
        params = list(blocks.parameters())
        candidates = {id(p) for p in controller.candidates.values()}
        state = {id(p) for opt in trainer.optimizers for p in opt.state}
        self.steps.append(
            Step(
                step=self._step,
                stepped=trainer.global_step > self._step,
                trainable={id(p) for p in params if p.requires_grad},
                expected=_permitted(self.methods, controller, blocks) & candidates,
                moved={id(p) for p in params if not torch.equal(self._before[id(p)], p.detach())},
                with_state={id(p) for p in params} & state,
                block_of={id(p): b for b, block in enumerate(blocks) for p in block.parameters()},
            )
        )


def _check_method(recorder: Recorder, min_training_steps: int = 1) -> None:
    """The method's promise at every step: its set and nothing else trains, and what trains changes."""
    assert recorder.steps
    for s in recorder.steps:
        assert s.trainable == s.expected, f"step {s.step}: blocks {s.blocks(s.trainable)} require grad"
        assert s.moved <= s.trainable, f"step {s.step}: frozen parameters of blocks {s.blocks(s.moved - s.trainable)}"
        if s.stepped:
            assert s.blocks(s.moved) == s.blocks(s.trainable), f"step {s.step}: a block that trains did not change"
        else:
            assert not s.moved
    assert sum(bool(s.trainable) and s.stepped for s in recorder.steps) >= min_training_steps


# ---------------------------------------------------------------------------------------------------- features


@dataclass
class Run:
    module: Module
    trainer: pl.Trainer
    recorder: Recorder
    methods: list[Callback]
    extra: list[Callback]
    warnings: list[str]


def _fit(tmp_path, method: str, module_kwargs=None, extra=(), module=None, **trainer_overrides) -> Run:
    methods = METHODS[method]()
    module = module or Module(lora=method == "ist_lora", **(module_kwargs or {}))
    recorder = Recorder(methods)
    overrides = dict(max_epochs=2, limit_train_batches=4, limit_val_batches=0)
    overrides.update(trainer_overrides)
    trainer = pl.Trainer(callbacks=[*methods, *extra, recorder], **trainer_kwargs(tmp_path, **overrides))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)
    return Run(module, trainer, recorder, methods, list(extra), [str(w.message) for w in caught])


def _params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def feature_clip_norm(tmp_path, method):
    run = _fit(tmp_path, method, gradient_clip_val=0.01, gradient_clip_algorithm="norm")
    _check_method(run.recorder)
    assert run.recorder.grad_norms and max(run.recorder.grad_norms) <= 0.01 * (1 + 1e-4)


def feature_clip_value(tmp_path, method):
    run = _fit(tmp_path, method, gradient_clip_val=1e-3, gradient_clip_algorithm="value")
    _check_method(run.recorder)
    assert run.recorder.grad_max and max(run.recorder.grad_max) <= 1e-3 * (1 + 1e-6)


def feature_swa(tmp_path, method):
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1, annealing_epochs=1)
    run = _fit(tmp_path, method, extra=[swa], max_epochs=3, limit_train_batches=3)
    _check_method(run.recorder)
    assert int(swa.n_averaged) >= 2  # weights averaged over epochs 1 and 2 ...
    assert _params_equal(run.module, swa._average_model)  # ... are the module's at the end
    assert run.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)  # SWA's learning rate


def feature_ema(tmp_path, method):
    ema = EMAWeightAveraging(decay=0.5)
    run = _fit(tmp_path, method, extra=[ema])
    _check_method(run.recorder)
    assert _params_equal(run.module, ema._average_model.module)  # the module holds the average at the end
    last = {id(p) for s in run.recorder.steps[-1:] for p in run.module.model.blocks.parameters() if id(p) in s.moved}
    assert last  # the last step trained a block whose average lags behind it


def feature_backbone_finetuning(tmp_path, method):
    backbone = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0)
    run = _fit(tmp_path, method, extra=[backbone], max_epochs=3, limit_train_batches=3)
    steps = run.recorder.steps
    _check_method(run.recorder)
    # BackboneFinetuning's promise: the backbone is frozen in epoch 0, then trains in a param group of its own ...
    assert not any(s.trainable for s in steps[:3])
    assert all(s.trainable for s in steps[3:])
    assert len(run.trainer.optimizers[0].param_groups) == 2
    # ... and the methods' sets hold on it from then on (checked per step), which both of them say
    adopted = [w for w in run.warnings if "BackboneFinetuning made" in w and "frozen when training started" in w]
    assert len(adopted) == 1, run.warnings
    if any(isinstance(m, LISA) for m in run.methods):
        pool = [w for w in run.warnings if w.startswith("LISA: 4 of 4 blocks have no parameter that may train")]
        assert len(pool) == 1 and "BackboneFinetuning" in pool[0]
        lisa = next(m for m in run.methods if isinstance(m, LISA))
        assert lisa.history[0][1] == [] and lisa.history[-1][1]


def feature_model_pruning(tmp_path, method):
    module = Module(lora=method == "ist_lora")
    linears = [(m, "weight") for m in module.modules() if type(m) is nn.Linear]  # LoRA's A and B as well
    pruning = ModelPruning("l1_unstructured", amount=0.5, parameters_to_prune=linears, verbose=0)
    run = _fit(tmp_path, method, module=module, extra=[pruning], max_epochs=3, limit_train_batches=3)
    _check_method(run.recorder)
    assert all(s.trainable for s in run.recorder.steps[3:])  # blocks still train after the first pruning
    fc1 = module.model.blocks[0].fc1
    weight = getattr(fc1, "base_layer", fc1).weight
    assert float((weight == 0).float().mean()) >= 0.5  # pruned (and made permanent at the end)


def feature_compile(tmp_path, method):
    run = _fit(tmp_path, method, module_kwargs={"compile": True}, max_epochs=1, limit_train_batches=6)
    _check_method(run.recorder)
    assert isinstance(run.module.model, torch._dynamo.eval_frame.OptimizedModule)
    if any(isinstance(m, LISA) for m in run.methods):  # several sets really ran through the compiled model
        assert len({tuple(b) for _, b in next(m for m in run.methods if isinstance(m, LISA)).history}) > 1


def feature_manual_optimization(tmp_path, method):
    run = _fit(tmp_path, method, module_kwargs={"manual": True})
    _check_method(run.recorder)
    assert run.trainer.global_step == 8


def feature_lr_finder(tmp_path, method):
    finder = LearningRateFinder(min_lr=1e-3, max_lr=0.5, num_training_steps=20, early_stop_threshold=None)
    run = _fit(tmp_path, method, extra=[finder], limit_train_batches=12)
    _check_method(run.recorder)
    assert finder.optimal_lr is not None and len(finder.optimal_lr.results["lr"]) == 20
    assert run.module.lr == finder.optimal_lr.suggestion() != LR
    assert run.trainer.global_step == 24  # the finder's steps are not counted: the fit starts from step 0


def feature_batch_size_finder(tmp_path, method):
    finder = BatchSizeFinder(mode="power", steps_per_trial=1, init_val=2, max_trials=3)
    run = _fit(tmp_path, method, extra=[finder])
    _check_method(run.recorder)
    assert run.module.batch_size == 8


def feature_accumulation(tmp_path, method):
    run = _fit(tmp_path, method, extra=[GradientAccumulationScheduler({0: 2})])
    _check_method(run.recorder)
    steps = run.recorder.steps
    assert run.trainer.global_step == 4 and [s.stepped for s in steps] == [False, True] * 4
    for micro, last in zip(steps[::2], steps[1::2], strict=True):  # the set never changes inside the window
        assert micro.trainable == last.trainable


def feature_second_fit(tmp_path, method):
    first = _fit(tmp_path, method)
    _check_method(first.recorder)
    trainable = {id(p) for p in first.module.parameters() if p.requires_grad}
    methods = METHODS[method]()
    recorder = Recorder(methods)
    trainer = pl.Trainer(
        callbacks=[*methods, recorder], **trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=4)
    )
    trainer.fit(first.module)
    _check_method(recorder)
    assert {id(p) for p in first.module.parameters() if p.requires_grad} == trainable  # restored after each fit


def feature_validate_every_step(tmp_path, method):
    run = _fit(tmp_path, method, val_check_interval=1, limit_val_batches=1)
    _check_method(run.recorder)
    assert run.module.validation_steps == 8


def feature_param_groups(tmp_path, method):
    run = _fit(tmp_path, method, module_kwargs={"groups": True})
    _check_method(run.recorder)
    groups = run.trainer.optimizers[0].param_groups
    in_blocks = {id(p) for p in run.module.model.blocks.parameters()}
    assert [g["lr"] for g in groups] == [LR, LR / 2]
    assert all(id(p) in in_blocks for p in groups[0]["params"]) and groups[1]["params"]


def feature_sgd_momentum(tmp_path, method):
    run = _fit(tmp_path, method, module_kwargs={"optimizer": "sgd"})
    _check_method(run.recorder)
    releases = all(m.release_optimizer_state for m in run.methods)
    for s in run.recorder.steps:
        assert s.trainable <= s.with_state  # what trains has its momentum
        if releases:
            assert s.with_state <= s.trainable  # what stopped training lost it
    optimizer = run.trainer.optimizers[0]
    assert all("momentum_buffer" in optimizer.state[p] for p in optimizer.state)


def feature_step_scheduler(tmp_path, method):
    run = _fit(tmp_path, method, module_kwargs={"scheduler": True})
    _check_method(run.recorder)
    assert run.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * 0.9**8)


def feature_bf16_mixed(tmp_path, method):
    run = _fit(tmp_path, method, precision="bf16-mixed")
    _check_method(run.recorder)
    assert run.module.autocast and all(run.module.autocast)


def feature_user_frozen(tmp_path, method):
    run = _fit(tmp_path, method, module_kwargs={"freeze_block0": True})
    _check_method(run.recorder)
    block0 = {id(p) for p in run.module.model.blocks[0].parameters()}
    assert not any(s.trainable & block0 or s.moved & block0 for s in run.recorder.steps)
    assert not run.module.model.head.bias.requires_grad  # the user's flags are theirs, after fit too
    lisa = next((m for m in run.methods if isinstance(m, LISA)), None)
    if lisa is not None and method == "lisa":  # block 0 is out of LISA's pool: every sampling trains a block
        assert all(blocks and 0 not in blocks for _, blocks in lisa.history)
        assert any("LISA: 1 of 4 blocks" in w and "LightningModule" in w for w in run.warnings)


def feature_on_exception_checkpoint(tmp_path, method):
    methods = METHODS[method]()
    module = Module(lora=method == "ist_lora", fail_at=3)
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    recorder = Recorder(methods)
    saver = OnExceptionCheckpoint(dirpath=tmp_path, filename="crash")
    trainer = pl.Trainer(
        callbacks=[*methods, saver, recorder], **trainer_kwargs(tmp_path, max_epochs=1, enable_checkpointing=True)
    )
    with pytest.raises(RuntimeError, match="the user's code failed"):
        trainer.fit(module)
    _check_method(recorder)
    assert {id(p) for p in module.parameters() if p.requires_grad} == trainable  # the flags are restored
    checkpoint = torch.load(tmp_path / "crash.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3
    names = " ".join(checkpoint["callbacks"])
    assert all(type(m).__name__ in names for m in methods)  # the methods' state, to resume from


FEATURES = {name.removeprefix("feature_"): fn for name, fn in sorted(globals().items()) if name.startswith("feature_")}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("method", list(METHODS))
def test_method_beside_feature(tmp_path, method, feature):
    FEATURES[feature](tmp_path, method)


@pytest.mark.parametrize("per_stack", [False, True])
def test_lisa_samples_only_blocks_that_may_train(tmp_path, per_stack, recwarn):
    module = Module()
    module.model.blocks[0].requires_grad_(False)
    module.model.blocks[1].requires_grad_(False)
    weights = None if per_stack else [1.0, 1.0, 1.0, 4.0]
    lisa = LISA(n_layers=3, interval=1, seed=0, plot=False, layer_weights=weights, per_stack=per_stack)
    recorder = Recorder([lisa])
    trainer = pl.Trainer(callbacks=[lisa, recorder], **trainer_kwargs(tmp_path, max_steps=4))
    trainer.fit(module)
    _check_method(recorder, min_training_steps=4)
    assert [blocks for _, blocks in lisa.history] == [[2, 3]] * 4  # three wanted, the two that may train drawn
    (message,) = [str(w.message) for w in recwarn if "blocks have no parameter that may train" in str(w.message)]
    assert "LISA: 2 of 4 blocks" in message and "'model.blocks.0', 'model.blocks.1'" in message and "HINT" in message


def test_compiled_model_holds_the_sets_beyond_dynamo_recompile_limit(tmp_path):
    # every new set recompiles (dynamo guards on requires_grad); past the limit dynamo runs the frame eagerly
    with torch._dynamo.config.patch(recompile_limit=1):
        run = _fit(tmp_path, "lisa", module_kwargs={"compile": True}, max_epochs=1, limit_train_batches=8)
    _check_method(run.recorder, min_training_steps=8)
    lisa = run.methods[0]
    assert len({tuple(b) for _, b in lisa.history}) > 1  # a second set: past the limit of one compiled graph
