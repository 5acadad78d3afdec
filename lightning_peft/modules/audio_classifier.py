"""An Audio Spectrogram Transformer classifier as a LightningModule, optionally adapted with HF peft."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_peft._validation import check_bool, check_choice, check_int
from lightning_peft.layout import find_head
from lightning_peft.models.ast import build_hf_ast, build_timm_ast
from lightning_peft.modules._base import ClassifierModule
from lightning_peft.modules._peft import apply_peft, build_peft_config

_BUILDERS = ("timm", "hf")


class AudioClassifier(ClassifierModule):
    """Classify audio filterbanks with an Audio Spectrogram Transformer (timm-based or Hugging Face).

    Two builders (see :mod:`lightning_peft.models.ast`):

    - ``builder="timm"``: the AST recipe on a timm ViT/DeiT named by ``model`` (random weights, timm's pretrained
      weights with ``pretrained=True``, or a local ``checkpoint_path``), with ``num_mel_bins``, ``target_length``
      and the overlapping patch strides ``fstride`` / ``tstride``; ``model_kwargs`` go to ``timm.create_model``
      (e.g. ``{"depth": 4}``);
    - ``builder="hf"``: ``ASTForAudioClassification`` from a local checkpoint folder or hub name in ``model``
      (its positional embedding adapted to ``target_length`` when that differs), or, with ``model=None``, from the
      ``ASTConfig`` fields in ``model_kwargs`` (``num_mel_bins``, ``target_length``, ``fstride``, ``tstride`` fill
      in the matching config fields).

    The network is ``self.model`` (a ``peft.PeftModel`` when ``peft`` is given; the head stays trainable). Batches
    are ``(features, labels)`` with features of shape ``(B, target_length, num_mel_bins)``, as
    :class:`~lightning_peft.data.SpokenKeywords` yields them. The optimizer is built in ``configure_optimizers``
    over every parameter that requires gradients at that moment, so layer-sampling callbacks such as LISA find
    all of them in it.

    Args:
        num_classes: Number of classes; the head is built (or rebuilt) with this many outputs.
        model: timm architecture (``builder="timm"``), or HF folder / hub name (``builder="hf"``; None: from config).
        builder: ``"timm"`` or ``"hf"``.
        pretrained: timm builder: start from timm's pretrained backbone weights (online or cached only).
        checkpoint_path: timm builder: a local state dict of the backbone ViT/DeiT or of a whole AST.
        model_kwargs: timm builder: more ``timm.create_model`` arguments; hf builder without ``model``: ``ASTConfig``
            fields; hf builder with ``model``: more ``from_pretrained`` arguments.
        num_mel_bins: Frequency bins of the input (128).
        target_length: Frames of the input (1024 for 10 s clips; 128 for 1 s keywords).
        fstride: Patch stride along frequency (10: overlapping patches, as in the AST paper).
        tstride: Patch stride along time.
        peft: An HF peft config as a dict (e.g. ``{"peft_type": "LORA", "r": 8, "target_modules": ["qkv"]}`` for
            the timm builder, ``["q_proj", "v_proj"]`` for the HF one) or a ``peft.PeftConfig``.
        optimizer: Builds the optimizer from the trainable parameters (AdamW, lr 1e-3 by default).
        scheduler: Builds a learning-rate scheduler from the optimizer; stepped after every optimizer step.

    Raises:
        ValueError: If ``builder`` is unknown, ``num_classes`` is below 2, an argument does not apply to the chosen
            builder, or ``peft`` is not a valid config.

    Example::

        >>> import torch
        >>> from lightning_peft.modules import AudioClassifier
        >>> timm_ast = AudioClassifier(4, "vit_tiny_patch16_224", target_length=64,
        ...                            model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
        >>> timm_ast(torch.randn(2, 64, 128)).shape
        torch.Size([2, 4])
        >>> hf_ast = AudioClassifier(4, None, builder="hf", target_length=64,
        ...                          model_kwargs={"hidden_size": 32, "num_hidden_layers": 2,
        ...                                        "num_attention_heads": 2, "intermediate_size": 64})
        >>> hf_ast(torch.randn(2, 64, 128)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        num_classes: int,
        model: str | None = "deit_base_distilled_patch16_384",
        builder: Literal["timm", "hf"] = "timm",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        num_mel_bins: int = 128,
        target_length: int = 1024,
        fstride: int = 10,
        tstride: int = 10,
        peft: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        check_choice(
            "builder",
            builder,
            _BUILDERS,
            "'timm' adapts a timm ViT/DeiT (the AST recipe), 'hf' builds ASTForAudioClassification.",
        )
        check_int(
            "num_classes",
            num_classes,
            2,
            "pass the number of classes of your data, e.g. `num_classes=10` for SpokenKeywords.",
            what="one output per class",
        )
        check_bool("pretrained", pretrained)
        for name, value in (("num_mel_bins", num_mel_bins), ("target_length", target_length)):
            check_int(name, value, 1, "the AST uses 128 mel bins and 1024 frames (128 for one-second clips).")
        for name, value in (("fstride", fstride), ("tstride", tstride)):
            check_int(name, value, 1, "the AST recipe uses 10 (overlapping patches); 16 gives no overlap.")
        if builder == "hf" and (pretrained or checkpoint_path is not None):
            raise ValueError(
                "`pretrained` and `checkpoint_path` are arguments of the timm builder, got them with builder='hf'."
                " HINT: pass the checkpoint folder as `model`."
            )
        if builder == "timm" and model is None:
            raise ValueError("`model` must name a timm ViT/DeiT for builder='timm'. HINT: e.g. 'vit_base_patch16_224'.")
        peft_config = build_peft_config(peft)
        super().__init__(num_classes=num_classes, optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.builder = builder
        kwargs = dict(model_kwargs or {})
        if builder == "timm":
            network = build_timm_ast(
                model,
                num_classes=num_classes,
                num_mel_bins=num_mel_bins,
                target_length=target_length,
                fstride=fstride,
                tstride=tstride,
                pretrained=pretrained,
                checkpoint_path=checkpoint_path,
                backbone_kwargs=kwargs,
            )
        elif model is None:
            config = {"num_mel_bins": num_mel_bins, "frequency_stride": fstride, "time_stride": tstride, **kwargs}
            network = build_hf_ast(config=config, num_labels=num_classes, max_length=target_length)
        else:
            network = build_hf_ast(model, num_labels=num_classes, max_length=target_length, **kwargs)
        if peft_config is not None:
            network = apply_peft(network, peft_config, head_names=find_head(network))
        self.model = network

    def forward(self, features: Tensor) -> Tensor:
        """Return the logits of filterbanks ``(B, target_length, num_mel_bins)``."""
        out = self.model(features)
        return out if isinstance(out, Tensor) else out.logits

    def logits_and_labels(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Return ``(logits, labels)`` of a ``(features, labels)`` batch."""
        features, labels = batch
        return self(features), labels
