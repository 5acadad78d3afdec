import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft.plugins import ActivationQuantizedPrecision


class MLP(pl.LightningModule):
    def __init__(self, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(64, 64, generator=generator)
        return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=32)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_training_steps_quantize_and_other_steps_do_not():
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 2))
    plugin = ActivationQuantizedPrecision("bf16-mixed", format="fp8_e4m3", min_numel=1024, device="cpu")
    assert plugin.convert_module(model) is model
    x = torch.randn(32, 64)
    with plugin.train_step_context():
        out = model(x)
    assert out.dtype == torch.bfloat16  # autocast, as MixedPrecision
    stats = plugin.last_stats
    assert stats.num_quantized >= 2  # the GELU input and the second Linear's input
    assert stats.bytes_after < stats.bytes_before
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    for context in (plugin.val_step_context, plugin.test_step_context, plugin.predict_step_context):
        with context(), torch.enable_grad():
            assert model(x).dtype == torch.bfloat16
    assert plugin.last_stats is stats and stats.num_saved == plugin.last_stats.num_saved


def test_hooks_are_removed_when_the_training_step_raises():
    model = nn.Linear(64, 64)
    plugin = ActivationQuantizedPrecision(min_numel=0, device="cpu")
    plugin.convert_module(model)
    with pytest.raises(RuntimeError, match="boom"), plugin.train_step_context():
        raise RuntimeError("boom")
    before = plugin.last_stats.num_saved
    model(torch.randn(8, 64, requires_grad=True)).exp().sum()
    assert plugin.last_stats.num_saved == before


def test_built_from_a_yaml_config_and_trains(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  default_root_dir: {tmp_path}
  accelerator: cpu
  max_steps: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  plugins:
    - class_path: lightning_peft.plugins.ActivationQuantizedPrecision
      init_args:
        precision: bf16-mixed
        format: fp8_e5m2
        group_size: 64
        min_numel: 1024
        device: cpu
"""
    )
    cli = LightningCLI(MLP, args=["--config", str(config)], run=False, save_config_callback=None)
    plugin = cli.trainer.precision_plugin
    assert isinstance(plugin, ActivationQuantizedPrecision)
    assert (plugin.precision, plugin.quantizer.format, plugin.quantizer.group_size) == ("bf16-mixed", "fp8_e5m2", 64)
    cli.trainer.fit(cli.model)
    assert cli.trainer.global_step == 2
    assert plugin.last_stats.num_quantized > 0


def test_bad_yaml_value_fails_when_the_cli_builds_the_plugin(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  plugins:
    - class_path: lightning_peft.plugins.ActivationQuantizedPrecision
      init_args: {format: int4}
"""
    )
    with pytest.raises(SystemExit):
        LightningCLI(MLP, args=["--config", str(config)], run=False)
    assert "int4" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"precision": "32-true"}, r"`precision` must be 'bf16-mixed' or '16-mixed', got '32-true'.*HINT"),
        ({"format": "int4"}, r"`format` must be one of 'int8', 'fp8_e4m3', 'fp8_e5m2', got 'int4'.*HINT"),
        ({"group_size": 0}, r"`group_size` must be an integer >= 1, got 0.*HINT"),
    ],
)
def test_misconfiguration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActivationQuantizedPrecision(device="cpu", **kwargs)
