"""The methods under FSDP2 (``ModelParallelStrategy`` with ``fully_shard``), 2 CPU processes with gloo.

tests/fsdp2_script.py trains and records; Lightning relaunches it once per rank.
"""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from fsdp2_script import Recorder, ShardedViT, loader
from helpers import run_config, trainer_kwargs
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_peft.callbacks import LISA, ActivationQuantization, EarlyPruning, HalfFineTuning
from lightning_peft.modules import ImageClassifier

SCRIPT = Path(__file__).parent / "fsdp2_script.py"


def _run(scenario: str, out: Path, *args: int) -> list[dict]:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), scenario, str(out), *map(str, args)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    prefix = "resumed_" if args[1:] == (1,) else ""
    return [torch.load(out / f"{prefix}rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def composed(tmp_path_factory) -> list[dict]:
    """Six steps of LISA + Half Fine-Tuning + 8-bit activations under FSDP2, uninterrupted."""
    return _run("compose", tmp_path_factory.mktemp("compose"), 6)


def _assert_ranks_identical(ranks: list[dict]) -> None:
    for name, weight in ranks[0]["final"].items():
        torch.testing.assert_close(weight, ranks[1]["final"][name], rtol=0, atol=0, msg=name)


def _block(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[1] == "blocks" else None


@pytest.mark.slow
def test_lisa_half_finetuning_and_quantization_compose_under_fsdp2(composed, tmp_path):
    ranks = composed
    _assert_ranks_identical(ranks)
    record = ranks[0]
    assert ranks[1]["steps"] == record["steps"]
    history = dict(record["lisa_history"])
    assert sorted(history) == [0, 2, 4]  # resampled every 2 steps
    for step, stats in enumerate(record["steps"]):
        sampled = history[step - step % 2]
        trainable, changed = set(stats["trainable"]), set(stats["changed"])
        # only the trainable parameters got a gradient, moved, and hold optimizer state (frozen state released)
        assert stats["with_grad"] == stats["trainable"]
        assert changed == trainable
        assert stats["state"] == stats["trainable"]
        # LISA: only sampled blocks train; Half Fine-Tuning: only part of each sampled block
        blocks = {_block(n) for n in trainable} - {None}
        assert blocks == set(sampled)
        for index in sampled:
            in_block = [n for n in record["initial"] if _block(n) == index]
            assert 0 < sum(n in trainable for n in in_block) < len(in_block)
        # the embeddings and the head always train
        assert {"model.patch_embed.proj.weight", "model.head.weight"} <= trainable
    # Half-Reset at the end: the half frozen by the current draw is back at its initial values
    assert record["hft_frozen"]
    for name in record["hft_frozen"]:
        torch.testing.assert_close(record["final"][name], record["initial"][name], rtol=0, atol=0, msg=name)

    # the quantizer decides as on one device: sharding changes neither what it quantizes nor the bytes
    torch.manual_seed(0)
    single = ActivationQuantization(min_numel=1024)
    module = ShardedViT()
    module.configure_model = lambda: None
    callbacks = [LISA(n_layers=2, interval=2, seed=1), HalfFineTuning(seed=2), single, Recorder(single)]
    pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, precision="bf16-mixed", max_steps=1)).fit(
        module, loader()
    )
    first = record["steps"][0]["stats"]
    assert first == vars(single.last_stats)
    assert first["num_quantized"] > 20 and first["bytes_after"] < 0.8 * first["bytes_before"]
    # autocast's weight copies are cast again in backward, from the parameters FSDP2 gathers again for it
    assert first["num_recomputed"] > 10 and first["bytes_weight_copies"] == 0


@pytest.mark.slow
def test_resume_under_fsdp2_continues_exactly(composed, tmp_path):
    """Stop after 4 steps (the end of an epoch), resume to 6: the same weights, bit for bit, on both ranks.

    The checkpoint lacks optimizer state of frozen parameters (released), which FSDP2's loader would miss; the
    Half-Reset values are sharded in memory and whole in the checkpoint, written by rank 0 alone.
    """
    _run("compose", tmp_path, 4)
    resumed = _run("compose", tmp_path, 6, 1)
    _assert_ranks_identical(resumed)
    for name, weight in composed[0]["final"].items():
        torch.testing.assert_close(resumed[0]["final"][name], weight, rtol=0, atol=0, msg=name)
    assert resumed[0]["lisa_history"] == composed[0]["lisa_history"]


@pytest.mark.slow
def test_ist_over_adapters_with_the_precision_plugin_under_fsdp2(tmp_path):
    ranks = _run("ist_plugin", tmp_path)
    _assert_ranks_identical(ranks)
    record = ranks[0]
    layer_of = {name: layer for layer, names in enumerate(record["ist_peft_params"]) for name in names}
    drawn: set[str] = set()
    for stats in record["steps"]:
        changed = set(stats["changed"])
        assert changed == set(stats["trainable"])
        # IST trains the adapters of int(0.25 * 4) = 1 layer per step; the backbone stays frozen
        assert len({layer_of[n] for n in changed if n in layer_of}) == 1
        assert changed - set(layer_of) == {"model.head.weight", "model.head.bias"}
        # layers drawn before keep their optimizer state for their next draw (IST's default, as the official code)
        drawn |= set(stats["trainable"])
        assert set(stats["state"]) == drawn
        quantized = stats["stats"]
        assert quantized["num_quantized"] > 10 and quantized["bytes_after"] < quantized["bytes_before"]


def test_early_pruning_refuses_fsdp2(tmp_path):
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=ModelParallelStrategy(),
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match=r"`EarlyPruning` slices parameters.*ModelParallelStrategy.*HINT"):
        EarlyPruning().setup(trainer, ShardedViT(), "fit")


@pytest.mark.slow
def test_a_ready_module_trains_under_fsdp2_from_yaml(tmp_path):
    """The YAML names ModelParallelStrategy; ImageClassifier shards itself; LISA and 8-bit activations join."""
    steps, _ = run_config(
        "vit_digits_lisa_fsdp2.yaml",
        tmp_path,
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=6",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1",
    )
    assert steps == 6
    metrics = (tmp_path / "lightning_logs" / "vit_digits_lisa_fsdp2" / "version_0" / "metrics.csv").read_text()
    header = metrics.splitlines()[0].split(",")
    assert {"trainable_params", "activation_quantization/bytes_after", "val/acc"} <= set(header)


class _Mesh:
    """A stand-in for a 2-D device mesh (data_parallel x tensor_parallel)."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, data_parallel: int, tensor_parallel: int) -> None:
        self.sizes = {"data_parallel": data_parallel, "tensor_parallel": tensor_parallel}

    def __getitem__(self, name: str):
        return SimpleNamespace(size=lambda: self.sizes[name])


def test_a_ready_module_refuses_tensor_parallel_devices_with_a_hint():
    module = ImageClassifier(
        "vit_tiny_patch16_224", num_classes=3, model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2}
    )
    module._device_mesh = _Mesh(data_parallel=1, tensor_parallel=2)
    with pytest.raises(ValueError, match=r"gives 2 devices to tensor parallelism.*HINT: `ModelParallelStrategy\("):
        module.configure_model()
    module._device_mesh = None
    module.configure_model()  # no mesh (not FSDP2): nothing to do
    assert not any(type(m).__name__.startswith("FSDP") for m in module.modules())


def test_bitsandbytes_optimizers_over_sharded_parameters_are_refused_before_a_step(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_peft._sharding import check_optimizers

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = torch.nn.Parameter(distribute_tensor(torch.randn(64, 64), mesh, [Shard(0)]))
        plain = torch.nn.Parameter(torch.randn(64, 64))
        refused = SimpleNamespace(optimizers=[bnb.optim.AdamW8bit([sharded])])
        with pytest.raises(ValueError, match=r"AdamW8bit.*DTensor.*HINT: use `torch.optim.AdamW`"):
            check_optimizers(refused)
        # the callbacks of the 8-bit-memory combination check at the start of training (LISA's, through the one
        # controller every layer-wise method goes through)
        from lightning_peft.trainable import TrainableSetController

        for callback in (ActivationQuantization(), TrainableSetController()):
            with pytest.raises(ValueError, match="cannot update FSDP2's sharded"):
                callback.on_train_start(refused, pl.LightningModule())
        # what works is let through: torch's AdamW over DTensors, the 8-bit optimizer over plain tensors
        check_optimizers(SimpleNamespace(optimizers=[torch.optim.AdamW([sharded]), bnb.optim.AdamW8bit([plain])]))
    finally:
        dist.destroy_process_group()
