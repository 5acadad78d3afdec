"""Each private Lightning / torch API the package uses, through its one function in lightning_peft._compat.

When an upgrade moves one of them, the test of that function fails here, naming the versions.
"""

import lightning
import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyBlockModel, trainer_kwargs
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn

from lightning_peft import _compat


def _versions() -> str:
    return f"lightning {lightning.__version__}, torch {torch.__version__}"


def test_ddp_constructor_kwargs_are_the_strategys_own_dict():
    strategy = DDPStrategy(find_unused_parameters=False, static_graph=False)
    kwargs = _compat.ddp_constructor_kwargs(strategy)
    kwargs["find_unused_parameters"] = True
    assert _compat.ddp_constructor_kwargs(strategy)["find_unused_parameters"] is True, _versions()


def test_logger_writes_this_step_follows_log_every_n_steps(tmp_path):
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(_compat.logger_writes_this_step(trainer))

    trainer = pl.Trainer(callbacks=[Watch()], max_steps=4, log_every_n_steps=2, **trainer_kwargs(tmp_path))
    trainer.fit(TinyBlockModel())
    assert seen == [False, True, False, True], _versions()


def test_run_before_checkpoint_load_wraps_once(tmp_path):
    strategy = SingleDeviceStrategy("cpu")
    calls = []

    def before(path, *args, **kwargs):
        calls.append(path)

    _compat.run_before_checkpoint_load(strategy, before)
    _compat.run_before_checkpoint_load(strategy, before)  # a second request does not wrap again
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, path)
    assert strategy.load_checkpoint(path)["state_dict"] == {}
    assert calls == [path], _versions()


def test_spawning_launchers_are_recognised():
    assert _compat.is_spawning_launcher(DDPStrategy(start_method="spawn")), _versions()
    assert not _compat.is_spawning_launcher(DDPStrategy()), _versions()


def test_rewrap_ddp_needs_the_strategys_setup_and_hook_registration():
    strategy = DDPStrategy()
    assert callable(strategy._setup_model) and callable(strategy._register_ddp_hooks), _versions()


def test_own_parameter_skips_parametrizations():
    linear = nn.Linear(3, 3)
    torch.nn.utils.parametrize.register_parametrization(linear, "weight", nn.Identity())
    assert _compat.own_parameter(linear, "weight") is None  # the original lives in the parametrization
    assert _compat.own_parameter(nn.Linear(3, 3), "weight").shape == (3, 3), _versions()


def test_muted_logging_restores_the_modules_log():
    module = TinyBlockModel()
    with _compat.muted_logging(module):
        module.log("x", 1.0)  # nothing happens: no trainer attached, no error
    assert module.log.__func__ is pl.LightningModule.log, _versions()


def test_a_missing_api_names_the_versions():
    with pytest.raises(_compat.CompatibilityError, match=rf"lightning {lightning.__version__} / torch.*HINT"):
        _compat.ddp_constructor_kwargs(object())
