"""The user's own images, one folder per class, prepared the way a timm model expects them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_peft._validation import check_bool, check_int
from lightning_peft.data._labelled import LabelledDataModule, split_class_folders

__all__ = ["IMAGE_SUFFIXES", "ImageFolder", "fixed_input_size", "timm_data_config"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def timm_data_config(model: str, image_size: int | None = None) -> dict[str, Any]:
    """Return the preprocessing a timm model was trained with: input size, interpolation, mean, std, crop.

    Read from the model's pretrained config (no weights are loaded); ``image_size`` replaces the input size, for a
    model built with another ``img_size``.

    Raises:
        ValueError: If ``model`` is not a timm architecture.

    Example::

        >>> from lightning_peft.data.image_folder import timm_data_config
        >>> config = timm_data_config("vit_tiny_patch16_224")
        >>> config["input_size"], config["interpolation"], config["mean"]
        ((3, 224, 224), 'bicubic', (0.5, 0.5, 0.5))
    """
    if not timm.is_model(model):
        raise ValueError(
            f"`model` must be a timm architecture (its data config gives the image size and normalisation), got"
            f" {model!r}. HINT: use the `model_name` of your ImageClassifier, e.g. 'vit_base_patch16_224'."
        )
    from timm.data import resolve_data_config

    config = resolve_data_config({}, pretrained_cfg=timm.get_pretrained_cfg(model).to_dict())
    if image_size is not None:
        config["input_size"] = (config["input_size"][0], image_size, image_size)
    return config


class _Images(Dataset):
    """Image files decoded as RGB and transformed; items are ``(image tensor, label)``."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(
                f"{path!r} (sample {index}, class index {label}) is not an image PIL can read: {err}."
                " HINT: remove or re-save the file (JPEG, PNG, ...)."
            ) from err
        return self.transform(rgb), label


class ImageFolder(LabelledDataModule):
    """Images in one folder per class, transformed as the timm ``model`` expects (size, interpolation, mean/std).

    ``root`` holds one sub-folder per class (``root/cat/*.jpg``, ``root/dog/*.png``; the class names are the folder
    names, sorted). With ``val_root`` (the same class folders) it is the validation set; without it, a seeded
    ``val_fraction`` of each class is held out. Images are decoded as RGB with PIL and transformed with timm's
    ``create_transform`` from the model's own data config (:func:`timm_data_config`): resize and centre crop,
    tensor, normalisation. With ``augment`` the training images get timm's training augmentation instead (random
    resized crop, horizontal flip, colour jitter). Batches are ``(images, labels)``: ``float32 (B, 3, H, W)`` and
    ``int64 (B,)``, as :class:`~lightning_peft.modules.ImageClassifier` takes them. The class names are kept in
    checkpoints (:attr:`label_names`).

    Args:
        root: Folder with one sub-folder of images per class (the training set, or all data without ``val_root``).
        model: The timm architecture whose data config sets the preprocessing (the classifier's ``model_name``).
        val_root: Validation folder with the same class sub-folders; None splits ``root``.
        val_fraction: Fraction of each class held out for validation when there is no ``val_root``.
        image_size: Input size for a model built with another ``img_size`` (e.g. 32). None: at ``setup``, the size
            the Trainer's model accepts (a ViT's ``img_size``, :func:`fixed_input_size`), else the architecture's.
        augment: Use timm's training augmentation on training images.
        batch_size: Images per batch.
        seed: Seed of the split and the training shuffle.
        num_workers: Worker processes of each DataLoader.

    Raises:
        ValueError: If an argument is out of range or ``model`` is not a timm architecture (at construction); if a
            folder has fewer than two classes or a class has no image, or ``image_size`` differs from the model's
            fixed input size (at ``setup``); if a file is not an image
            (when it is loaded, naming the file).
        FileNotFoundError: If ``root`` / ``val_root`` is not a folder, or ``val_root`` lacks a class (at ``setup``).

    Example::

        >>> import os, tempfile
        >>> from PIL import Image
        >>> from lightning_peft.data import ImageFolder
        >>> root = tempfile.mkdtemp()
        >>> for name in ("cat", "dog"):
        ...     os.makedirs(os.path.join(root, name))
        ...     for i in range(4):
        ...         Image.new("RGB", (40, 30), (60 * i, 0, 0)).save(os.path.join(root, name, f"{i}.png"))
        >>> data = ImageFolder(root, model="vit_tiny_patch16_224", image_size=32, batch_size=2, val_fraction=0.25)
        >>> data.setup("fit")
        >>> images, labels = next(iter(data.train_dataloader()))
        >>> images.shape, data.label_names
        (torch.Size([2, 3, 32, 32]), ('cat', 'dog'))
    """

    def __init__(
        self,
        root: str,
        model: str = "vit_base_patch16_224",
        val_root: str | None = None,
        val_fraction: float = 0.1,
        image_size: int | None = None,
        augment: bool = False,
        batch_size: int = 32,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_int("image_size", image_size, 1, "None takes the model's input size.", allow_none=True)
        check_bool("augment", augment)
        self._class_folder_settings(root, val_root, val_fraction, batch_size, seed, num_workers)
        self.data_config = timm_data_config(model, image_size)
        self.save_hyperparameters()
        self.model_name = model
        self.augment = augment

    def transform(self, training: bool) -> Callable:
        """Return timm's transform for training (augmented when ``augment``) or evaluation images."""
        from timm.data import create_transform

        return create_transform(**self.data_config, is_training=training and self.augment)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            self.check_model_outputs()
            return
        self.label_names, train, val = split_class_folders(
            self.root, self.val_root, self.val_fraction, self.seed, IMAGE_SUFFIXES, "image"
        )
        self._follow_model_input_size()
        self.train_set = _Images(train, self.transform(training=True))
        self.val_set = _Images(val, self.transform(training=False))
        self.test_set = self.val_set
        self.check_model_outputs()

    def _follow_model_input_size(self) -> None:
        """Resize to the Trainer's model's fixed input size (a ViT's ``img_size``) unless ``image_size`` says so.

        Raises:
            ValueError: If ``image_size`` was given and the model takes another size.
        """
        trainer = getattr(self, "trainer", None)
        size = fixed_input_size(getattr(trainer, "lightning_module", None)) if trainer is not None else None
        if size is None or tuple(self.data_config["input_size"][1:]) == size:
            return
        given = self.hparams.get("image_size")
        if given is not None:
            raise ValueError(
                f"`image_size` is {given}, but the model takes {size[0]}x{size[1]} images (its `img_size`)."
                f" HINT: set --data.init_args.image_size={size[0]}, or leave `image_size` out: the images then follow"
                " the model's size."
            )
        self.data_config["input_size"] = (self.data_config["input_size"][0], *size)
        rank_zero_info(f"ImageFolder: images resized to {size[0]}x{size[1]}, the model's input size (`img_size`).")


def fixed_input_size(module: Any) -> tuple[int, int] | None:
    """The image size a model accepts when it accepts only one (timm's patch embedding with a strict size), else None.

    Example::

        >>> import timm
        >>> fixed_input_size(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1))
        (32, 32)
        >>> fixed_input_size(timm.create_model("resnet18")) is None
        True
    """
    from timm.layers import PatchEmbed

    if module is None:
        return None
    for layer in module.modules():
        if isinstance(layer, PatchEmbed) and layer.img_size is not None and layer.strict_img_size:
            if not getattr(layer, "dynamic_img_size", False):
                return (int(layer.img_size[0]), int(layer.img_size[1]))
    return None
