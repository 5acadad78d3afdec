"""Audio Spectrogram Transformers (AST): a timm ViT/DeiT adapted to filterbanks, and Hugging Face's AST.

Paper: Gong et al. 2021, "AST: Audio Spectrogram Transformer", https://arxiv.org/abs/2104.01778.

The AST recipe turns an image transformer into an audio classifier:

- the input is a log-mel filterbank of ``target_length`` frames x ``num_mel_bins`` bins, seen as a one-channel
  image of height ``num_mel_bins`` (frequency) and width ``target_length`` (time);
- the patch embedding is a ``Conv2d`` with one input channel, the backbone's patch size as kernel (16) and
  *overlapping* strides ``(fstride, tstride)`` (10 in the paper); its weights start as the backbone's RGB kernels
  summed over the colour channels;
- the positional embedding of the backbone's 2-D patch grid (14 x 14 for a 224^2 ViT/16) is adapted to the new
  grid axis by axis: an axis that shrinks is centre-cropped, one that grows is interpolated (bilinear);
- the class token (and DeiT's distillation token) are kept; after the final norm their outputs are averaged and
  go through a ``LayerNorm`` + ``Linear`` head.

:func:`build_timm_ast` builds this from any timm ViT/DeiT (random weights, timm's pretrained weights where online,
or a local state dict); :func:`build_hf_ast` builds Hugging Face ``ASTForAudioClassification`` from a config or
from a local checkpoint folder (what users of ``MIT/ast-finetuned-audioset-*`` have). Both are found by
:func:`lightning_peft.layout.find_blocks` without configuration (``blocks``, and
``audio_spectrogram_transformer.layers`` in transformers 5).
Inputs of both are filterbanks of shape ``(batch, target_length, num_mel_bins)``, time first, as
:class:`transformers.ASTFeatureExtractor` returns them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_peft._validation import check_bool, check_int
from lightning_peft.layout import find_head

__all__ = [
    "AudioSpectrogramTransformer",
    "adapt_position_embedding",
    "ast_patch_grid",
    "build_hf_ast",
    "build_timm_ast",
]


def ast_patch_grid(num_mel_bins: int, target_length: int, fstride: int, tstride: int, patch_size: int = 16):
    """Return the ``(frequency, time)`` size of the patch grid of an AST input.

    Example::

        >>> ast_patch_grid(128, 1024, 10, 10)
        (12, 101)
    """
    for name, value in (("num_mel_bins", num_mel_bins), ("target_length", target_length)):
        check_int(
            name,
            value,
            patch_size,
            f"AST uses 128 mel bins and at least {patch_size} frames.",
            what=f"at least the patch size {patch_size}",
        )
    for name, value in (("fstride", fstride), ("tstride", tstride)):
        check_int(name, value, 1, "the AST recipe uses 10.")
    return (num_mel_bins - patch_size) // fstride + 1, (target_length - patch_size) // tstride + 1


def _fit_axis(grid: Tensor, axis: int, size: int) -> Tensor:
    """Centre-crop (shrink) or bilinearly interpolate (grow) one spatial axis of a ``(1, D, H, W)`` grid."""
    old = grid.shape[axis]
    if size == old:
        return grid
    if size < old:
        start = old // 2 - size // 2
        return grid.narrow(axis, start, size)
    target = list(grid.shape[2:])
    target[axis - 2] = size
    return F.interpolate(grid, size=tuple(target), mode="bilinear", align_corners=False)


def adapt_position_embedding(grid_embedding: Tensor, new_grid: tuple[int, int]) -> Tensor:
    """Adapt a 2-D grid of positional embeddings to another grid, one axis at a time, as the AST recipe does.

    The time (width) axis is fitted first, then the frequency (height) axis; an axis that shrinks keeps its
    centre (``start = old // 2 - new // 2``), one that grows is interpolated bilinearly.

    Args:
        grid_embedding: Embeddings of shape ``(1, H, W, D)`` (the backbone's patch grid, prefix tokens removed).
        new_grid: ``(frequency, time)`` size of the new grid.

    Returns:
        A tensor of shape ``(1, frequency * time, D)``, flattened frequency-major like the patch embedding's output.

    Example::

        >>> import torch
        >>> grid = torch.randn(1, 14, 14, 8)
        >>> adapt_position_embedding(grid, (12, 101)).shape
        torch.Size([1, 1212, 8])
    """
    if grid_embedding.dim() != 4 or grid_embedding.shape[0] != 1:
        raise ValueError(
            f"`grid_embedding` must have shape (1, H, W, D), got {tuple(grid_embedding.shape)}."
            " HINT: reshape the patch part of a (1, N, D) positional embedding to its (H, W) grid first."
        )
    grid = grid_embedding.permute(0, 3, 1, 2)  # (1, D, H, W)
    grid = _fit_axis(grid, 3, new_grid[1])
    grid = _fit_axis(grid, 2, new_grid[0])
    return grid.flatten(2).transpose(1, 2).contiguous()


class AudioSpectrogramTransformer(nn.Module):
    """A timm ViT/DeiT adapted to filterbank inputs as in the AST recipe; build it with :func:`build_timm_ast`.

    Modules: ``patch_embed`` (one-channel ``Conv2d`` with overlapping strides), the tokens ``cls_token`` (and
    ``dist_token`` for DeiT), ``pos_embed``, the backbone's ``norm_pre``, ``blocks`` and ``norm``, and ``head``
    (``LayerNorm`` + ``Linear``). The prediction is the head applied to the average of the class (and distillation)
    token outputs.

    Args:
        backbone: A timm ``VisionTransformer`` (or ``VisionTransformerDistilled``) with a class token and a learned
            positional embedding; its blocks, norms and tokens are taken over.
        num_classes: Outputs of the head.
        num_mel_bins: Frequency bins of the input.
        target_length: Frames of the input.
        fstride: Stride of the patches along frequency (10: overlapping 16-wide patches).
        tstride: Stride along time.

    Raises:
        ValueError: If the backbone has no class token, has register tokens or no learned positional embedding.

    Example::

        >>> import timm, torch
        >>> from lightning_peft.models.ast import AudioSpectrogramTransformer
        >>> backbone = timm.create_model("vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=2)
        >>> model = AudioSpectrogramTransformer(backbone, num_classes=5, num_mel_bins=128, target_length=64)
        >>> model(torch.randn(2, 64, 128)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_mel_bins: int = 128,
        target_length: int = 1024,
        fstride: int = 10,
        tstride: int = 10,
    ) -> None:
        super().__init__()
        if getattr(backbone, "cls_token", None) is None or getattr(backbone, "pos_embed", None) is None:
            raise ValueError(
                f"`backbone` {type(backbone).__name__} needs a class token and a learned positional embedding."
                " HINT: use a timm ViT or DeiT, e.g. 'vit_base_patch16_224' or 'deit_base_distilled_patch16_384'."
            )
        if getattr(backbone, "reg_token", None) is not None or getattr(backbone, "no_embed_class", False):
            raise ValueError(
                f"`backbone` {type(backbone).__name__} has register tokens or unembedded class tokens, which the AST"
                " recipe does not cover. HINT: use a plain timm ViT or DeiT."
            )
        old_conv = backbone.patch_embed.proj
        patch = tuple(old_conv.kernel_size)
        dim = old_conv.out_channels
        self.num_mel_bins = num_mel_bins
        self.target_length = target_length
        self.grid = ast_patch_grid(num_mel_bins, target_length, fstride, tstride, patch_size=patch[0])

        self.patch_embed = nn.Conv2d(1, dim, kernel_size=patch, stride=(fstride, tstride))
        with torch.no_grad():  # the RGB kernels summed over colours respond to a grey image as before
            self.patch_embed.weight.copy_(old_conv.weight.sum(dim=1, keepdim=True))
            if old_conv.bias is not None:
                self.patch_embed.bias.copy_(old_conv.bias)
        self.cls_token = backbone.cls_token
        self.dist_token = getattr(backbone, "dist_token", None)
        self.num_prefix_tokens = 1 + (self.dist_token is not None)
        old_grid = tuple(backbone.patch_embed.grid_size)
        pos = backbone.pos_embed.detach()
        prefix_pos, patch_pos = pos[:, : self.num_prefix_tokens], pos[:, self.num_prefix_tokens :]
        patch_pos = adapt_position_embedding(patch_pos.reshape(1, *old_grid, dim), self.grid)
        self.pos_embed = nn.Parameter(torch.cat([prefix_pos, patch_pos], dim=1))
        self.pos_drop = backbone.pos_drop
        self.norm_pre = backbone.norm_pre
        self.blocks = backbone.blocks
        self.norm = backbone.norm
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def get_classifier(self) -> nn.Module:
        """The classification head (timm's name for it; :func:`~lightning_peft.layout.find_head` reads it)."""
        return self.head

    def forward_features(self, features: Tensor) -> Tensor:
        """Return the normalised token sequence ``(B, prefix + patches, D)`` of filterbanks ``(B, T, F)``."""
        if features.dim() != 3 or features.shape[1:] != (self.target_length, self.num_mel_bins):
            raise ValueError(
                f"AudioSpectrogramTransformer expects filterbanks of shape (batch, {self.target_length},"
                f" {self.num_mel_bins}) (time, frequency), got {tuple(features.shape)}."
                " HINT: make the features with the same `target_length` and `num_mel_bins` as the model."
            )
        x = self.patch_embed(features.unsqueeze(1).transpose(2, 3))  # (B, 1, F, T) -> (B, D, f, t)
        x = x.flatten(2).transpose(1, 2)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*prefix, x], dim=1) + self.pos_embed
        x = self.norm_pre(self.pos_drop(x))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, features: Tensor) -> Tensor:
        """Return the logits ``(B, num_classes)`` of filterbanks ``(B, target_length, num_mel_bins)``."""
        tokens = self.forward_features(features)
        return self.head(tokens[:, : self.num_prefix_tokens].mean(dim=1))


def _load_backbone_weights(backbone: nn.Module, checkpoint_path: str) -> None:
    """Load a timm ViT/DeiT state dict into the backbone, skipping the image classification head."""
    state_dict = timm.models.load_state_dict(checkpoint_path)
    own = backbone.state_dict()
    skipped = [k for k, v in state_dict.items() if k not in own or tuple(v.shape) != tuple(own[k].shape)]
    kept = {k: v for k, v in state_dict.items() if k not in skipped}
    if not kept:
        raise ValueError(
            f"`checkpoint_path` {checkpoint_path!r} has no weight named and shaped like the backbone's"
            f" (e.g. {next(iter(own))!r} {tuple(next(iter(own.values())).shape)})."
            " HINT: pass a state dict of the same timm architecture and size, or an AST state dict saved with"
            " `torch.save(ast_model.state_dict(), path)`."
        )
    backbone.load_state_dict(kept, strict=False)
    missing = [k for k in own if k not in kept]
    heads = tuple(f"{name}." for name in (*find_head(backbone), "fc_norm"))  # the image head, not the backbone's
    ignored = [k for k in skipped if not k.startswith(heads)]
    if missing:
        rank_zero_warn(f"{checkpoint_path!r} has no weights for {len(missing)} backbone keys: {missing}.")
    if ignored:
        rank_zero_warn(f"Ignored {len(ignored)} weights of {checkpoint_path!r} (name or shape differ): {ignored}.")


def build_timm_ast(
    backbone: str = "deit_base_distilled_patch16_384",
    num_classes: int = 527,
    num_mel_bins: int = 128,
    target_length: int = 1024,
    fstride: int = 10,
    tstride: int = 10,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> AudioSpectrogramTransformer:
    """Build an AST from a timm ViT/DeiT, as the AST recipe does.

    Args:
        backbone: A timm ViT/DeiT architecture (the paper: ``deit_base_distilled_patch16_384``).
        num_classes: Outputs of the head (AudioSet: 527).
        num_mel_bins: Frequency bins of the input filterbanks (128).
        target_length: Frames of the input (1024 = 10.24 s at a 10 ms shift).
        fstride: Patch stride along frequency; 10 gives the paper's overlapping 16x16 patches, 16 none.
        tstride: Patch stride along time.
        pretrained: Start the backbone from timm's pretrained weights (needs the hub or timm's cache).
        checkpoint_path: A local state dict file, either of the timm backbone (an ImageNet ViT/DeiT: its positional
            embedding and patch kernels are adapted as above; its image head is skipped) or of a whole AST built by
            this function with the same arguments (loaded as is).
        backbone_kwargs: More arguments for ``timm.create_model``, e.g. ``{"depth": 4, "embed_dim": 192}``.

    Returns:
        An :class:`AudioSpectrogramTransformer` (random weights unless ``pretrained`` or ``checkpoint_path``).

    Raises:
        ValueError: If ``backbone`` is not a timm model, ``pretrained`` and ``checkpoint_path`` are both set, or the
            checkpoint matches neither the backbone nor the AST.
        FileNotFoundError: If ``checkpoint_path`` does not exist.

    Example::

        >>> import torch
        >>> from lightning_peft.models import build_timm_ast
        >>> model = build_timm_ast("vit_tiny_patch16_224", num_classes=4, target_length=64,
        ...                        backbone_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
        >>> model.grid, model(torch.randn(1, 64, 128)).shape
        ((12, 5), torch.Size([1, 4]))
    """
    if not timm.is_model(backbone):
        raise ValueError(
            f"`backbone` must be a timm ViT/DeiT architecture, got {backbone!r}."
            " HINT: e.g. 'vit_base_patch16_224', 'deit_base_distilled_patch16_384', or 'vit_tiny_patch16_224'."
        )
    check_int("num_classes", num_classes, 1, "e.g. num_classes=10.")
    for name, value in (("fstride", fstride), ("tstride", tstride)):
        check_int(name, value, 1, "the AST recipe uses 10.")
    check_bool("pretrained", pretrained)
    if pretrained and checkpoint_path is not None:
        raise ValueError(
            f"`pretrained=True` and `checkpoint_path` exclude each other, got checkpoint_path={checkpoint_path!r}."
            " HINT: keep `checkpoint_path` to start from a local file, or `pretrained=True` for timm's weights."
        )
    if checkpoint_path is not None and not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(
            f"`checkpoint_path` must be an existing file, got {checkpoint_path!r}."
            " HINT: save one with `torch.save(model.state_dict(), path)` or fix the path."
        )
    kwargs = dict(backbone_kwargs or {})
    kwargs.pop("num_classes", None)
    state_dict = timm.models.load_state_dict(checkpoint_path) if checkpoint_path is not None else None
    is_ast_checkpoint = state_dict is not None and "patch_embed.weight" in state_dict
    if pretrained:
        from lightning_peft.models.pretrained import check_timm_weights_available

        check_timm_weights_available(backbone)
    vit = timm.create_model(backbone, pretrained=pretrained, num_classes=0, **kwargs)
    if checkpoint_path is not None and not is_ast_checkpoint:
        _load_backbone_weights(vit, checkpoint_path)
    model = AudioSpectrogramTransformer(vit, num_classes, num_mel_bins, target_length, fstride, tstride)
    if is_ast_checkpoint:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as err:
            raise ValueError(
                f"`checkpoint_path` {checkpoint_path!r} is an AST state dict of other sizes: {err}"
                " HINT: build with the `backbone`, `num_classes`, `num_mel_bins`, `target_length` and strides it was"
                " saved with."
            ) from err
    return model


def _adapt_hf_time_axis(model: nn.Module, max_length: int) -> None:
    """Give a loaded HF AST another input length by adapting its positional embedding along time."""
    config = model.config
    embeddings = model.audio_spectrogram_transformer.embeddings
    old_grid = embeddings.get_shape(config)
    config.max_length = max_length
    new_grid = embeddings.get_shape(config)
    pos = embeddings.position_embeddings.detach()
    prefix, patches = pos[:, :2], pos[:, 2:]
    adapted = adapt_position_embedding(patches.reshape(1, *old_grid, pos.shape[-1]), new_grid)
    embeddings.position_embeddings = nn.Parameter(torch.cat([prefix, adapted], dim=1))


def build_hf_ast(
    model: str | None = None,
    config: Mapping[str, Any] | None = None,
    num_labels: int | None = None,
    max_length: int | None = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Build Hugging Face ``ASTForAudioClassification`` from a local checkpoint folder (or hub name) or a config.

    Args:
        model: A folder with ``config.json`` and weights (e.g. a saved ``MIT/ast-finetuned-audioset-10-10-0.4593``)
            or a hub name (online only). Exclusive with ``config``.
        config: ``ASTConfig`` fields for a randomly initialised model, e.g. ``{"hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128, "max_length": 128}``.
        num_labels: Outputs of the classifier; a loaded head of another size is re-initialised.
        max_length: Frames of the input. For a loaded model whose ``max_length`` differs, the positional embedding
            is adapted along time (centre crop or interpolation), as for the timm AST; with ``config`` it sets
            ``max_length``.
        **from_pretrained_kwargs: More arguments for ``from_pretrained`` (e.g. ``attn_implementation``).

    Returns:
        An ``ASTForAudioClassification`` in train mode.

    Raises:
        ValueError: If neither or both of ``model`` and ``config`` are given, or ``config`` has unknown fields.
        OSError: If ``model`` can be loaded neither from disk nor from the hub.

    Example::

        >>> import torch
        >>> from lightning_peft.models import build_hf_ast
        >>> ast = build_hf_ast(config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        ...                            "intermediate_size": 64}, num_labels=3, max_length=64)
        >>> ast(torch.randn(2, 64, 128)).logits.shape
        torch.Size([2, 3])
    """
    from transformers import ASTConfig, ASTForAudioClassification

    if (model is None) == (config is None):
        raise ValueError(
            f"Give exactly one of `model` (a checkpoint folder) and `config` (ASTConfig fields), got model={model!r}"
            f" and config={config!r}. HINT: e.g. config={{'hidden_size': 192, 'num_hidden_layers': 4}}."
        )
    check_int("num_labels", num_labels, 1, "None keeps the checkpoint's head; e.g. num_labels=10.", allow_none=True)
    check_int("max_length", max_length, 1, "frames of the input, e.g. 1024 (10 s) or 128.", allow_none=True)
    if config is not None:
        fields = dict(config)
        if num_labels is not None:
            fields["num_labels"] = num_labels
        if max_length is not None:
            fields["max_length"] = max_length
        known = set(ASTConfig().to_dict())
        unknown = sorted(set(fields) - known - {"num_labels", "id2label", "label2id"})
        if unknown:
            raise ValueError(
                f"`config` has fields that ASTConfig does not know: {unknown}."
                " HINT: use ASTConfig's names, e.g. hidden_size, num_hidden_layers, num_attention_heads,"
                " intermediate_size, num_mel_bins, max_length, frequency_stride, time_stride."
            )
        return ASTForAudioClassification(ASTConfig(**fields)).train()
    kwargs = dict(from_pretrained_kwargs)
    if num_labels is not None:
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    from lightning_peft.models.pretrained import load_pretrained

    # Local folder or HF cache; a clear error within seconds when neither has it and the hub cannot be used.
    network = load_pretrained(ASTForAudioClassification, model, "model", **kwargs)
    if max_length is not None and max_length != network.config.max_length:
        _adapt_hf_time_axis(network, max_length)
    return network.train()
