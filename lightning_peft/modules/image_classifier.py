"""A timm image classifier as a LightningModule, optionally adapted with HF peft."""

import difflib
import os
from typing import Any

import timm
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_peft._validation import check_bool, check_int
from lightning_peft.layout import find_head
from lightning_peft.models.pretrained import check_timm_weights_available
from lightning_peft.modules._base import ClassifierModule, checked_model_kwargs
from lightning_peft.modules._peft import apply_peft, build_peft_config

_RESERVED_MODEL_KWARGS = ("num_classes", "pretrained", "checkpoint_path", "model_name")


class ImageClassifier(ClassifierModule):
    """Classify images with any timm model, fully fine-tuned or through an HF peft adapter.

    The network is stored as ``self.model`` (a ``peft.PeftModel`` when ``peft`` is given). The optimizer is built in
    ``configure_optimizers`` over every parameter that requires gradients at that moment, so callbacks that freeze
    and unfreeze layers later find all of them in it. Batches are ``(images, labels)`` tuples.

    Args:
        model_name: A timm architecture name, e.g. ``"vit_tiny_patch16_224"``.
        num_classes: Number of classes; the head is built (or rebuilt) with this many outputs.
        pretrained: Let timm load its pretrained weights (needs the hub or timm's cache).
        checkpoint_path: A local timm/torch state dict (``.pth``, ``.bin`` or ``.safetensors``) to start from.
            Weights whose shape differs from the model (typically the head of another class count) are dropped
            with a warning that names them.
        model_kwargs: More arguments for ``timm.create_model``, e.g. ``{"img_size": 32, "patch_size": 8}``.
        peft: An HF peft config as a dict, e.g. ``{"peft_type": "LORA", "r": 8, "lora_alpha": 16,
            "target_modules": ["qkv"]}``, or a ``peft.PeftConfig``. When it sets no ``modules_to_save``, timm's
            classifier module is added there so the head keeps training.
        optimizer: Builds the optimizer from the trainable parameters (AdamW, lr 1e-3 by default).
        scheduler: Builds a learning-rate scheduler from the optimizer; stepped after every optimizer step.

    Raises:
        ValueError: If ``model_name`` is not a timm model, ``num_classes`` is below 2, ``pretrained`` and
            ``checkpoint_path`` are both set, ``model_kwargs`` repeats an argument of this class, or ``peft`` is
            not a valid config.
        FileNotFoundError: If ``checkpoint_path`` does not exist.
        ValueError: If ``checkpoint_path`` holds no weight named like the model's.

    Example::

        >>> import torch
        >>> from lightning_peft.modules import ImageClassifier
        >>> module = ImageClassifier(
        ...     "vit_tiny_patch16_224", num_classes=10,
        ...     model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2},
        ...     peft={"peft_type": "LORA", "r": 4, "target_modules": ["qkv"]},
        ... )
        >>> module(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        peft: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        check_int(
            "num_classes",
            num_classes,
            2,
            "pass the number of classes of your data, e.g. `num_classes=10` for digits.",
            what="one output per class",
        )
        check_bool("pretrained", pretrained)
        if not timm.is_model(model_name):
            close = difflib.get_close_matches(str(model_name), timm.list_models(), n=3)
            raise ValueError(
                f"`model_name` must be a timm architecture, got {model_name!r}."
                f" HINT: close names are {close}; `timm.list_models('*vit*')` lists more."
            )
        if pretrained and checkpoint_path is not None:
            raise ValueError(
                f"`pretrained=True` and `checkpoint_path` exclude each other, got checkpoint_path={checkpoint_path!r}."
                " HINT: keep `checkpoint_path` to start from a local file, or `pretrained=True` to use timm's weights."
            )
        if checkpoint_path is not None and not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(
                f"`checkpoint_path` must be an existing file, got {checkpoint_path!r}."
                " HINT: save one with `torch.save(model.state_dict(), path)` or fix the path."
            )
        model_kwargs = checked_model_kwargs("ImageClassifier", model_kwargs, _RESERVED_MODEL_KWARGS)
        peft_config = build_peft_config(peft)
        super().__init__(num_classes=num_classes, optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])

        if pretrained:
            check_timm_weights_available(model_name)  # fails within seconds offline instead of retrying for a minute
        model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **model_kwargs)
        if checkpoint_path is not None:
            load_matching_state_dict(model, checkpoint_path)
        if peft_config is not None:
            model = apply_peft(model, peft_config, head_names=find_head(model))
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        """Return the logits of a batch of images."""
        return self.model(images)

    def logits_and_labels(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Return ``(logits, labels)`` of an ``(images, labels)`` batch."""
        images, labels = batch
        return self(images), labels


def load_matching_state_dict(model: nn.Module, checkpoint_path: str) -> None:
    """Load a local timm/torch checkpoint into ``model``, dropping the weights whose shape does not match.

    Args:
        model: The freshly built model.
        checkpoint_path: A state dict file; wrappers such as ``{"state_dict": ...}`` and ``.safetensors`` are read
            by timm's loader.

    Raises:
        ValueError: If no weight of the file has a name of the model (another architecture or a prefixed dict).
    """
    state_dict = timm.models.load_state_dict(checkpoint_path)
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    for key in mismatched:
        del state_dict[key]
    if not any(k in own for k in state_dict):
        raise ValueError(
            f"`checkpoint_path` {checkpoint_path!r} has no weight named like the model's (e.g. {next(iter(own))!r})."
            " HINT: pass a state dict of the same timm architecture, saved with `torch.save(model.state_dict(), path)`."
        )
    result = model.load_state_dict(state_dict, strict=False)
    if mismatched:
        shapes = ", ".join(f"{k} {tuple(own[k].shape)}" for k in mismatched)
        rank_zero_warn(
            f"Dropped {len(mismatched)} weights of {checkpoint_path!r} whose shape differs from the model's"
            f" (kept the new initialisation): {shapes}."
        )
    missing = [k for k in result.missing_keys if k not in mismatched]
    if missing:
        rank_zero_warn(f"{checkpoint_path!r} has no weights for {len(missing)} model keys: {missing}.")
    if result.unexpected_keys:
        rank_zero_warn(
            f"Ignored {len(result.unexpected_keys)} weights of {checkpoint_path!r} that the model does not have:"
            f" {result.unexpected_keys}."
        )
