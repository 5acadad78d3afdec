"""Builders of networks (plain ``nn.Module``): the Audio Spectrogram Transformer and offline pretrained loading.

Nothing here is a LightningModule: these functions return the network that a ready module of
:mod:`lightning_peft.modules` (or the user's own LightningModule) trains.
"""

from lightning_peft.models.ast import AudioSpectrogramTransformer, build_hf_ast, build_timm_ast
from lightning_peft.models.pretrained import OFFLINE_COPIES, resolve_pretrained

__all__ = ["OFFLINE_COPIES", "AudioSpectrogramTransformer", "build_hf_ast", "build_timm_ast", "resolve_pretrained"]
