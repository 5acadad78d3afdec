"""scikit-learn's 8x8 handwritten digits as small RGB-like images, for offline vision fine-tuning."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset
from typing_extensions import override

from lightning_peft._validation import check_int, check_number
from lightning_peft.data._split import SplitDataModule


class Digits(SplitDataModule):
    """The 1,797 handwritten digits of ``sklearn.datasets.load_digits``, resized for image models.

    Each 8x8 image (values 0-16) becomes a float tensor in [0, 1], is resized with bilinear interpolation to
    ``image_size`` x ``image_size``, replicated to ``channels`` channels and normalised with ``mean`` and ``std``.
    The split is a seeded permutation, identical for every instance with the same ``seed``. Batches are
    ``(images, labels)`` tuples: images ``float32`` of shape ``(B, channels, image_size, image_size)``, labels
    ``int64``.

    Args:
        image_size: Side of the square images the model sees, e.g. 32 or 224.
        channels: Number of channels (the grey image is repeated), 1 or 3 for most models.
        mean: Normalisation mean, one value or one per channel.
        std: Normalisation standard deviation, one value or one per channel (all > 0).
        batch_size: Samples per batch.
        val_fraction: Fraction of the images held out for validation.
        test_fraction: Fraction held out for testing; when None, the test loader reuses the validation split.
        seed: Seed of the split and of the training shuffle.
        num_workers: Worker processes of each DataLoader.

    Raises:
        ValueError: If a size or count is not positive, the fractions leave no training data, or ``mean`` / ``std``
            do not have one value per channel.
        ImportError: If scikit-learn is not installed (raised by ``setup``).

    Example::

        >>> from lightning_peft.data import Digits
        >>> data = Digits(image_size=16, batch_size=4)
        >>> data.setup("fit")
        >>> images, labels = next(iter(data.train_dataloader()))
        >>> images.shape, labels.shape
        (torch.Size([4, 3, 16, 16]), torch.Size([4]))
    """

    num_classes = 10

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        test_fraction: float | None = None,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_int("image_size", image_size, 1, "e.g. image_size=32 (the 8x8 digits are resized to it).")
        check_int("channels", channels, 1, "3 for ImageNet-style models, 1 for grey-scale ones.")
        check_int("batch_size", batch_size, 1, "e.g. batch_size=32.")
        check_int("num_workers", num_workers, 0, "use 0 on small data.")
        check_number("val_fraction", val_fraction, 0, 1, "e.g. val_fraction=0.2.", "a number in (0, 1)")
        check_number(
            "test_fraction",
            test_fraction,
            0,
            1,
            "e.g. test_fraction=0.2, or None to test on the validation split.",
            "None or a number in [0, 1)",
            include_low=True,
            allow_none=True,
        )
        if val_fraction + (test_fraction or 0.0) >= 0.9:
            raise ValueError(
                f"`val_fraction` + `test_fraction` must be below 0.9, got {val_fraction!r} +"
                f" {test_fraction!r}. HINT: keep most of the 1,797 images for training, e.g. val_fraction=0.2."
            )
        self.mean = self._per_channel("mean", mean, channels)
        self.std = self._per_channel("std", std, channels)
        if (self.std <= 0).any():
            raise ValueError(f"`std` must be positive (every channel's > 0), got {std!r}. HINT: e.g. std=0.5.")
        self.save_hyperparameters()
        self.image_size = image_size
        self.channels = channels
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    @staticmethod
    def _per_channel(name: str, value: float | Sequence[float], channels: int) -> Tensor:
        values = [float(value)] * channels if isinstance(value, (int, float)) else [float(v) for v in value]
        if len(values) != channels:
            raise ValueError(
                f"`{name}` must be one value or {channels} values (one per channel), got {list(values)}."
                f" HINT: pass a single float such as {name}=0.5."
            )
        return torch.tensor(values).view(channels, 1, 1)

    def _images(self, raw: Tensor) -> Tensor:
        images = (raw.float() / 16.0).view(-1, 1, 8, 8)
        if self.image_size != 8:
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        images = images.expand(-1, self.channels, -1, -1)
        return ((images - self.mean) / self.std).contiguous()

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError("Digits needs scikit-learn. HINT: pip install scikit-learn") from err
        digits = load_digits()
        images = self._images(torch.from_numpy(digits.data))
        labels = torch.from_numpy(digits.target).long()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        n_val = max(1, round(self.val_fraction * len(labels)))
        n_test = round((self.test_fraction or 0.0) * len(labels))
        val_idx, test_idx, train_idx = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        self.test_set = TensorDataset(images[test_idx], labels[test_idx]) if n_test else self.val_set
