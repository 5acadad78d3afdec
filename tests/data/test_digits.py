import doctest

import pytest
import torch

import lightning_peft.data.digits as digits_module
from lightning_peft.data import Digits

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits():
    data = Digits(batch_size=32)
    data.setup("fit")
    return data


def test_split_sizes_cover_the_dataset(digits):
    assert len(digits.train_set) + len(digits.val_set) == 1797
    assert len(digits.val_set) == round(0.2 * 1797)
    assert digits.test_set is digits.val_set
    assert Digits.num_classes == 10


def test_batches_have_image_shapes_dtypes_and_normalised_range(digits):
    images, labels = next(iter(digits.train_dataloader()))
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (32,) and labels.dtype == torch.int64
    all_images = digits.train_set.tensors[0]
    # [0, 1] normalised with mean 0.5, std 0.5 -> [-1, 1], and the full range is used.
    assert all_images.min() == pytest.approx(-1.0) and all_images.max() == pytest.approx(1.0)
    assert torch.equal(all_images[:, 0], all_images[:, 2])


def test_every_class_is_in_both_splits(digits):
    for dataset in (digits.train_set, digits.val_set):
        counts = torch.bincount(dataset.tensors[1], minlength=10)
        assert (counts > 0).all()
        assert counts.max() / counts.sum() < 0.2


def test_split_and_shuffle_are_the_same_for_two_instances(digits):
    other = Digits(batch_size=32)
    other.setup("fit")
    assert torch.equal(other.val_set.tensors[0], digits.val_set.tensors[0])
    assert torch.equal(next(iter(other.train_dataloader()))[1], next(iter(digits.train_dataloader()))[1])
    reseeded = Digits(batch_size=32, seed=7)
    reseeded.setup("fit")
    assert not torch.equal(reseeded.val_set.tensors[1], digits.val_set.tensors[1])


def test_separate_test_split_one_channel_and_per_channel_stats():
    data = Digits(image_size=8, channels=1, mean=[0.0], std=[1.0], val_fraction=0.1, test_fraction=0.1)
    data.setup("test")
    assert len(data.train_set) + len(data.val_set) + len(data.test_set) == 1797
    assert data.test_set is not data.val_set
    images, _ = next(iter(data.test_dataloader()))
    assert images.shape[1:] == (1, 8, 8)
    assert images.min() >= 0.0 and images.max() <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, "`image_size` must be an integer >= 1"),
        ({"batch_size": 0}, "`batch_size` must be an integer >= 1"),
        ({"val_fraction": 1.5}, "`val_fraction` must be a number in"),
        ({"val_fraction": 0.5, "test_fraction": 0.45}, "below 0.9"),
        ({"mean": [0.5, 0.5]}, "`mean` must be one value or 3 values"),
        ({"std": 0.0}, "`std` must be positive"),
        ({"num_workers": -1}, "`num_workers` must be"),
    ],
)
def test_misconfiguration_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        Digits(**kwargs)
    assert "HINT:" in str(info.value)


def test_docstring_example_runs():
    assert doctest.testmod(digits_module).failed == 0
