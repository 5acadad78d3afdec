"""Each method beside each Lightning feature a user may already have: it works, keeping both promises, or refuses.

A method is a row (:data:`METHODS`: how to add it to a run, what it promises, which features it refuses and with
which message), a feature is a column (:data:`FEATURES`: how it changes the module / Trainer, what it promises).
Every cell runs a tiny model for a few steps and checks both promises, or expects the refusal. A new method is one
more row: a factory, a check and its refusals.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer_kwargs
from lightning.pytorch.callbacks import (
    Callback,
    EMAWeightAveraging,
    GradientAccumulationScheduler,
    LearningRateFinder,
    ModelPruning,
    OnExceptionCheckpoint,
    StochasticWeightAveraging,
)
from pruning_helpers import PruneModule
from torch import nn

from lightning_peft.callbacks import ActivationQuantization, EarlyPruning
from lightning_peft.plugins import ActivationQuantizedPrecision

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 5  # optimizer steps of a cell's run (the loader has 6 batches)


class FeatureModule(PruneModule):
    """The pruning tests' tiny timm ViT with the switches the features need; records losses and first gradients."""

    def __init__(
        self,
        lora: bool = True,
        manual: bool = False,
        compile: bool = False,
        optimizer: str = "adamw",
        scheduler: bool = False,
        validation: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__("timm", lora=lora, lr=1e-2, scheduler=scheduler)
        self.automatic_optimization = not manual
        self.compile, self.optimizer_name, self.validation = compile, optimizer, validation
        self.compile_backend = compile_backend
        self.losses: list[float] = []
        self.first_grads: dict[str, torch.Tensor] | None = None
        self.val_steps = 0

    def configure_model(self):
        # as Lightning's documentation shows it
        if self.compile and not hasattr(self.net, "_orig_mod"):
            self.net = torch.compile(self.net, backend=self.compile_backend)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(float(loss))
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return loss

    def on_after_backward(self):
        if self.first_grads is None:
            self.first_grads = {
                _plain(n): p.grad.detach().float().clone() for n, p in self.named_parameters() if p.grad is not None
            }

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        else:
            optimizer = torch.optim.AdamW(params, lr=self.lr)
        if not self.use_scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def validation_step(self, batch, batch_idx):
        self.val_steps += 1
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def val_dataloader(self):
        return self.train_dataloader() if self.validation else []


def _plain(name: str) -> str:
    return name.replace("_orig_mod.", "")


class Probe(Callback):
    """What every cell reads: gradients as the optimizer steps with them, quantizer activity, validation."""

    def __init__(self, quantizer_of: Callable[[], Any] | None = None) -> None:
        self.quantizer_of = quantizer_of
        self.grad_norms: list[float] = []
        self.grad_max: list[float] = []
        self.quantized: list[int] = []
        self.hooks_in_validation: list[bool] = []
        self._handle = None

    def on_train_start(self, trainer, pl_module):
        def record(optimizer, args, kwargs):  # the (clipped) gradients the step used
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            self.grad_max.append(max(float(g.abs().max()) for g in grads))

        self._handle = trainer.optimizers[0].register_step_post_hook(record)

    def on_train_end(self, trainer, pl_module):
        self._handle.remove()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.quantizer_of is not None:
            self.quantized.append(self.quantizer_of().stats.num_quantized)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.quantizer_of is not None:
            self.hooks_in_validation.append(self.quantizer_of().hooks_active)


@dataclass
class Run:
    """One cell's run: the module, the method's objects, the feature's callbacks, the trainers used."""

    module: FeatureModule
    method: Any
    feature_callbacks: list[Callback]
    probe: Probe
    trainers: list[pl.Trainer] = field(default_factory=list)
    params_before: int = 0
    reference: FeatureModule | None = None

    @property
    def trainer(self) -> pl.Trainer:
        return self.trainers[-1]

    def feature(self, kind: type) -> Any:
        return next(c for c in self.feature_callbacks if isinstance(c, kind))


# ------------------------------------------------------------------------------------------------------- methods
@dataclass
class Method:
    """A row: how a method joins a run, what it promises (``check``), what it refuses (feature -> message regex)."""

    make: Callable[[], tuple[Any, list[Callback], list[Any]]]  # -> (method object, callbacks, plugins)
    check: Callable[[Run], None]
    lora: bool = True
    # the compile column's backend: inductor is what users run (and what checks saved tensors' strides); where the
    # cell is about paths and shape changes, aot_eager runs dynamo's guards and AOT autograd without inductor's
    # code generation for each recompilation (minutes on a busy CPU)
    compile_backend: str = "inductor"
    quantizer: Callable[[Any], Any] | None = None  # the method object's ActivationQuantizer, if any
    precision: str | None = None  # a precision plugin fixes the precision
    refuses: dict[str, str] = field(default_factory=dict)


def _make_early_pruning():
    pruning = EarlyPruning(estimation_steps=2, max_loss_increase=None, plot=False)
    return pruning, [pruning], []


def _check_early_pruning(run: Run) -> None:
    pruning, module = run.method, run.module
    assert pruning.pruned and pruning.pruned_at is not None
    with_heads = [m for m in module.modules() if hasattr(m, "num_heads") and hasattr(m, "qkv")]
    assert with_heads and all(m.num_heads == 4 for m in with_heads)  # 6 heads, a third pruned
    assert sum(p.numel() for p in module.parameters()) < run.params_before
    assert len(module.losses) > pruning.pruned_at and all(torch.isfinite(torch.tensor(module.losses)))
    # the optimizer holds the pruned parameters, its state shaped like them
    optimizer = run.trainer.optimizers[0]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in module.parameters() if p.requires_grad
    }
    for param, state in optimizer.state.items():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim():
                assert value.shape == param.shape


def _make_callback_quantization():
    callback = ActivationQuantization(min_numel=256, log_bytes=False)
    return callback, [callback], []


def _make_plugin_quantization():
    plugin = ActivationQuantizedPrecision("bf16-mixed", min_numel=256, device="cpu")
    return plugin, [], [plugin]


def _check_quantization(run: Run) -> None:
    assert run.probe.quantized and all(n > 0 for n in run.probe.quantized), run.probe.quantized
    assert not run.method.quantizer.hooks_active
    assert run.reference is not None and run.reference.first_grads.keys() == run.module.first_grads.keys()
    cosines = [
        float(nn.functional.cosine_similarity(ref.flatten(), run.module.first_grads[name].flatten(), dim=0))
        for name, ref in run.reference.first_grads.items()
        if ref.norm() > 0
    ]
    assert min(cosines) >= 0.98, min(cosines)
    assert all(torch.isfinite(torch.tensor(run.module.losses)))


METHODS: dict[str, Method] = {
    "early_pruning": Method(
        _make_early_pruning,
        _check_early_pruning,
        compile_backend="aot_eager",
        refuses={"model_pruning": r"`EarlyPruning` cannot run with Lightning's `ModelPruning`.*HINT"},
    ),
    "activation_quantization": Method(
        _make_callback_quantization, _check_quantization, lora=False, quantizer=lambda m: m.quantizer
    ),
    "activation_quantized_precision": Method(
        _make_plugin_quantization,
        _check_quantization,
        lora=False,
        quantizer=lambda m: m.quantizer,
        precision="bf16-mixed",
    ),
}


# ------------------------------------------------------------------------------------------------------ features
@dataclass
class Feature:
    """A column: module switches, Trainer arguments, callbacks, what the feature promises, how many fits."""

    check: Callable[[Run], None]
    module: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    callbacks: Callable[[], list[Callback]] = list
    fits: int = 1
    raises: type[BaseException] | None = None  # the feature itself ends the fit with this exception
    reference_module: dict[str, Any] | None = None  # the unquantized reference run's switches (default: `module`)


def _check_clip_norm(run: Run) -> None:
    assert run.probe.grad_norms and max(run.probe.grad_norms) <= 0.1 * (1 + 1e-4)


def _check_clip_value(run: Run) -> None:
    assert run.probe.grad_max and max(run.probe.grad_max) <= 1e-3 * (1 + 1e-4)


def _check_swa(run: Run) -> None:
    swa = run.feature(StochasticWeightAveraging)
    assert swa.n_averaged is not None and int(swa.n_averaged) >= 1
    averaged = dict(swa._average_model.named_parameters())
    for name, param in run.module.named_parameters():  # the average was transferred at the end
        torch.testing.assert_close(param, averaged[name])


def _check_ema(run: Run) -> None:
    ema = run.feature(EMAWeightAveraging)
    average = ema._average_model
    assert int(average.n_averaged) >= 1
    own = dict(run.module.named_parameters())
    for name, param in average.module.named_parameters():
        assert param.shape == own[name].shape


def _check_model_pruning(run: Run) -> None:
    weights = [m.weight for m in run.module.modules() if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros > 0.3


def _check_compile(run: Run) -> None:
    assert hasattr(run.module.net, "_orig_mod")  # still the compiled wrapper
    assert run.trainer.global_step == STEPS


def _check_steps(run: Run) -> None:
    assert run.trainer.global_step == STEPS


def _check_lr_finder(run: Run) -> None:
    finder = run.feature(LearningRateFinder)
    assert finder.optimal_lr is not None and len(finder.optimal_lr.results["lr"]) > 0
    suggestion = finder.optimal_lr.suggestion()
    assert suggestion is not None and run.module.lr == suggestion
    assert run.trainer.global_step == STEPS


def _check_accumulation(run: Run) -> None:
    assert run.trainer.global_step == STEPS and len(run.module.losses) == 2 * STEPS


def _check_second_fit(run: Run) -> None:
    assert [t.global_step for t in run.trainers] == [STEPS, STEPS]
    assert len(run.module.losses) == 2 * STEPS


def _check_validation(run: Run) -> None:
    assert run.module.val_steps >= STEPS
    assert not any(run.probe.hooks_in_validation)  # validation is never quantized


def _check_momentum(run: Run) -> None:
    optimizer = run.trainer.optimizers[0]
    assert optimizer.state and all(
        state["momentum_buffer"].shape == param.shape for param, state in optimizer.state.items()
    )


def _check_step_scheduler(run: Run) -> None:
    lr = run.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-2 * 0.9**STEPS)


def _check_bf16(run: Run) -> None:
    assert run.trainer.precision == "bf16-mixed"


class Stop(Exception):
    """The failure of the run that ``OnExceptionCheckpoint`` saves a checkpoint on."""


class FailAt(Callback):
    """Fails the run before its last step (after every method has done what it does early)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == STEPS - 1:
            raise Stop("stop")


def _check_on_exception(run: Run) -> None:
    checkpoint = run.feature(OnExceptionCheckpoint)
    saved = torch.load(checkpoint.ckpt_path, weights_only=False)
    assert saved["global_step"] == STEPS - 1
    if isinstance(run.method, EarlyPruning):
        assert saved["pruning_plan"] == run.method.plan.to_dict()
        fresh = FeatureModule()
        from lightning_peft.pruning import restore_pruned_architecture

        assert restore_pruned_architecture(fresh, saved)
        fresh.load_state_dict(saved["state_dict"])


FEATURES: dict[str, Feature] = {
    "clip_norm": Feature(_check_clip_norm, trainer={"gradient_clip_val": 0.1}),
    "clip_value": Feature(_check_clip_value, trainer={"gradient_clip_val": 1e-3, "gradient_clip_algorithm": "value"}),
    "swa": Feature(
        _check_swa,
        trainer={"max_steps": -1, "max_epochs": 2, "limit_train_batches": 3},
        callbacks=lambda: [StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=1)],
    ),
    "ema": Feature(_check_ema, callbacks=lambda: [EMAWeightAveraging()]),
    "model_pruning": Feature(
        _check_model_pruning,
        trainer={"max_steps": -1, "max_epochs": 2, "limit_train_batches": 3},
        callbacks=lambda: [ModelPruning("l1_unstructured", amount=0.5, verbose=0)],
    ),
    "compile": Feature(_check_compile, module={"compile": True}, reference_module={}),
    "manual_optimization": Feature(_check_steps, module={"manual": True}),
    "lr_finder": Feature(
        _check_lr_finder,
        callbacks=lambda: [LearningRateFinder(min_lr=1e-4, max_lr=1e-1, num_training_steps=20, update_attr=True)],
    ),
    "gradient_accumulation": Feature(
        _check_accumulation,
        trainer={"limit_train_batches": 10},
        callbacks=lambda: [GradientAccumulationScheduler({0: 2})],
    ),
    "second_fit": Feature(_check_second_fit, fits=2),
    "validation_every_step": Feature(
        _check_validation, module={"validation": True}, trainer={"val_check_interval": 1, "limit_val_batches": 1}
    ),
    "sgd_momentum": Feature(_check_momentum, module={"optimizer": "sgd"}),
    "step_lr_scheduler": Feature(_check_step_scheduler, module={"scheduler": True}),
    "bf16_mixed": Feature(_check_bf16, trainer={"precision": "bf16-mixed"}),
    "on_exception_checkpoint": Feature(
        _check_on_exception,
        trainer={"enable_checkpointing": True},
        callbacks=lambda: [OnExceptionCheckpoint(".", filename="on_exception")],
        raises=Stop,
    ),
}


# ---------------------------------------------------------------------------------------------------------- runs
def _fit(tmp_path, module, callbacks, plugins, feature: Feature, precision: str | None) -> list[pl.Trainer]:
    kwargs = trainer_kwargs(tmp_path, **{"max_steps": STEPS, "limit_val_batches": 0, **feature.trainer})
    if precision is not None:  # the method's precision plugin sets it; its reference runs use the same
        kwargs.pop("precision", None)
        if not plugins:
            kwargs["precision"] = precision
    for callback in callbacks:
        if isinstance(callback, OnExceptionCheckpoint):
            callback.dirpath = str(tmp_path)
    trainers = []
    for _ in range(feature.fits):
        trainer = pl.Trainer(
            callbacks=[*callbacks, FailAt()] if feature.raises else callbacks, plugins=plugins, **kwargs
        )
        trainers.append(trainer)
        if feature.raises is not None:
            with pytest.raises(feature.raises):
                trainer.fit(module)
        else:
            trainer.fit(module)
    return trainers


_REFERENCES: dict[tuple, FeatureModule] = {}


def _reference(tmp_path, feature_name: str, feature: Feature, method: Method) -> FeatureModule:
    """The run without the method (same feature, precision and model), for the gradient comparison."""
    switches = feature.module if feature.reference_module is None else feature.reference_module
    key = (feature_name, method.precision, method.lora)
    if key not in _REFERENCES:
        torch.manual_seed(0)
        module = FeatureModule(lora=method.lora, **switches)
        _fit(tmp_path / "reference", module, [Probe(), *feature.callbacks()], [], feature, method.precision)
        _REFERENCES[key] = module
    return _REFERENCES[key]


@pytest.mark.parametrize("feature_name", list(FEATURES))
@pytest.mark.parametrize("method_name", list(METHODS))
def test_method_beside_lightning_feature(tmp_path, method_name, feature_name):
    method, feature = METHODS[method_name], FEATURES[feature_name]
    torch.manual_seed(0)
    module = FeatureModule(lora=method.lora, compile_backend=method.compile_backend, **feature.module)
    method_object, callbacks, plugins = method.make()
    quantizer_of = None if method.quantizer is None else (lambda: method.quantizer(method_object))
    probe = Probe(quantizer_of)
    feature_callbacks = feature.callbacks()
    run = Run(
        module, method_object, feature_callbacks, probe, params_before=sum(p.numel() for p in module.parameters())
    )
    everything = [*callbacks, probe, *feature_callbacks]
    if feature_name in method.refuses:
        trainer = pl.Trainer(callbacks=everything, plugins=plugins, **trainer_kwargs(tmp_path, max_steps=STEPS))
        with pytest.raises(ValueError, match=method.refuses[feature_name]) as refusal:
            trainer.fit(module)
        message = str(refusal.value)
        assert type(method_object).__name__ in message
        assert any(type(c).__name__ in message for c in feature_callbacks) or re.search(feature_name, message)
        return
    if method.check is _check_quantization:
        run.reference = _reference(tmp_path, feature_name, feature, method)
    torch.manual_seed(0)
    run.trainers = _fit(tmp_path, module, everything, plugins, feature, method.precision)
    method.check(run)
    feature.check(run)
