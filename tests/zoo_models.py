"""Tiny randomly initialised models for the method x architecture matrix tests.

Every entry of :data:`ZOO` builds offline from a config (no downloads), in eval mode and deterministically, and comes
with matching keyword inputs and an accessor that picks a floating tensor from the output to build a loss from.
Run this file to build and check every entry.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_peft.layout import AttentionSpec, MlpSpec, register_layout

VOCAB = 128
SEQ = 12
DEC_SEQ = 8
NUM_CLASSES = 10
USER_FEATURES = 16


@dataclass(frozen=True)
class ZooEntry:
    """A tiny model, its inputs and how to read a tensor out of its output."""

    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict[str, torch.Tensor]]
    kind: str
    family: str
    causal_lm: bool = False
    output: Callable[[Any], torch.Tensor] = lambda out: out


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        model = factory()
        for module in model.modules():  # stochastic depth on by default in some timm configs (Swin): off
            if isinstance(getattr(module, "drop_prob", None), float):
                module.drop_prob = 0.0
        # some timm models start with an all-zero head (MLP-Mixer, Hiera): no gradient would reach the blocks
        for name, param in model.named_parameters():
            if name.startswith(("head", "fc.")) and param.dim() == 2 and not param.any():
                nn.init.normal_(param, std=0.02)
        return model.eval()

    return build


# ---------------------------------------------------------------------------------------------------------------------
# inputs


def _image_inputs(size: int, key: str = "pixel_values") -> Callable[[int], dict[str, torch.Tensor]]:
    return lambda batch: {key: torch.randn(batch, 3, size, size, generator=_gen())}


def _token_inputs(seq: int = SEQ, vocab: int = VOCAB) -> Callable[[int], dict[str, torch.Tensor]]:
    # Ids start at 4 so that no special (pad/bos/eos) token shows up in the batch.
    return lambda batch: {"input_ids": torch.randint(4, vocab, (batch, seq), generator=_gen())}


def _seq2seq_inputs(batch: int) -> dict[str, torch.Tensor]:
    g = _gen()
    return {
        "input_ids": torch.randint(4, VOCAB, (batch, SEQ), generator=g),
        "decoder_input_ids": torch.randint(4, VOCAB, (batch, DEC_SEQ), generator=g),
    }


def _audio_inputs(batch: int) -> dict[str, torch.Tensor]:
    return {"input_values": torch.randn(batch, 320, generator=_gen())}


def _whisper_inputs(batch: int) -> dict[str, torch.Tensor]:
    g = _gen()
    return {
        "input_features": torch.randn(batch, 16, 16, generator=g),
        "decoder_input_ids": torch.randint(4, VOCAB, (batch, DEC_SEQ), generator=g),
    }


def _ast_inputs(batch: int) -> dict[str, torch.Tensor]:
    return {"input_values": torch.randn(batch, 16, 16, generator=_gen())}


def _image_text_inputs(size: int) -> Callable[[int], dict[str, torch.Tensor]]:
    def inputs(batch: int) -> dict[str, torch.Tensor]:
        g = _gen()
        return {
            "input_ids": torch.randint(4, VOCAB, (batch, SEQ), generator=g),
            "pixel_values": torch.randn(batch, 3, size, size, generator=g),
        }

    return inputs


def _features_inputs(batch: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch, SEQ, USER_FEATURES, generator=_gen())}


def _logits(out: Any) -> torch.Tensor:
    return out.logits


def _hidden(out: Any) -> torch.Tensor:
    return out.last_hidden_state


# ---------------------------------------------------------------------------------------------------------------------
# timm


def _timm(kind: str, size: int, factory: Callable[[], nn.Module]) -> ZooEntry:
    return ZooEntry(build=_seeded(factory), inputs=_image_inputs(size, key="x"), kind=kind, family="timm")


def _create(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)

    return factory


def _timm_class(module: str, cls: str, **kwargs: Any) -> Callable[[], nn.Module]:
    # For models whose registered constructor fixes the arguments we want to shrink.
    def factory() -> nn.Module:
        return getattr(importlib.import_module(f"timm.models.{module}"), cls)(num_classes=NUM_CLASSES, **kwargs)

    return factory


_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 4, "img_size": 32}
_STAGES4 = (2, 2, 2, 2)
_DIMS4 = (16, 32, 48, 64)
_HEADS4 = (1, 2, 2, 4)

TIMM_ZOO: dict[str, ZooEntry] = {
    "timm_vit": _timm("single", 32, _create("vit_tiny_patch16_224", patch_size=8, **_VIT)),
    "timm_deit": _timm("single", 32, _create("deit_tiny_distilled_patch16_224", patch_size=8, **_VIT)),
    "timm_beit": _timm("single", 32, _create("beit_base_patch16_224", patch_size=8, **_VIT)),
    "timm_eva02": _timm("single", 28, _create("eva02_tiny_patch14_224", **{**_VIT, "img_size": 28})),
    "timm_cait": _timm("single", 32, _create("cait_xxs24_224", patch_size=8, depth_token_only=1, **_VIT)),
    "timm_xcit": _timm("single", 32, _create("xcit_nano_12_p16_224", cls_attn_layers=1, **_VIT)),
    "timm_mixer": _timm(
        "single", 32, _timm_class("mlp_mixer", "MlpMixer", img_size=32, patch_size=8, num_blocks=2, embed_dim=32)
    ),
    "timm_swin": _timm(
        "windows",
        32,
        _create(
            "swin_tiny_patch4_window7_224", depths=(2, 2), num_heads=(2, 4), embed_dim=32, img_size=32, window_size=4
        ),
    ),
    "timm_swinv2": _timm(
        "windows",
        32,
        _create("swinv2_tiny_window8_256", depths=(2, 2), num_heads=(2, 4), embed_dim=32, img_size=32, window_size=4),
    ),
    "timm_maxvit": _timm("windows", 64, _create("test_maxvit", img_size=64)),
    "timm_tiny_vit": _timm(
        "windows",
        64,
        _timm_class(
            "tiny_vit",
            "TinyVit",
            embed_dims=_DIMS4,
            depths=_STAGES4,
            num_heads=_HEADS4,
            window_sizes=(2, 2, 2, 2),
            drop_path_rate=0.0,
        ),
    ),
    "timm_davit": _timm(
        "windows",
        64,
        _create("davit_tiny", depths=_STAGES4, embed_dims=_DIMS4, num_heads=_HEADS4, window_size=2),
    ),
    "timm_resnet": _timm("stages", 32, _create("resnet18", layers=(2, 2, 2, 2), channels=_DIMS4, stem_width=16)),
    "timm_efficientnet": _timm("stages", 32, _create("test_efficientnet")),
    "timm_convnext": _timm("stages", 32, _create("convnext_atto", depths=(2, 2, 2, 2), dims=_DIMS4)),
    "timm_regnet": _timm("stages", 32, _create("regnetx_002")),
    "timm_mobilenetv3": _timm("stages", 32, _create("mobilenetv3_small_050")),
    "timm_densenet": _timm("stages", 32, _timm_class("densenet", "DenseNet", growth_rate=8, block_config=(2, 2, 2, 2))),
    "timm_vgg": _timm("stages", 32, _timm_class("vgg", "VGG", cfg=[16, "M", 32, "M", 64, "M"], mlp_ratio=1 / 64)),
    "timm_pvt_v2": _timm("stages", 32, _create("pvt_v2_b0", depths=_STAGES4, embed_dims=_DIMS4, num_heads=_HEADS4)),
    "timm_levit": _timm(
        "stages",
        64,
        _create("levit_128s", img_size=64, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 2, 2), depth=(2, 2, 2)),
    ),
    "timm_poolformer": _timm("stages", 32, _timm_class("metaformer", "MetaFormer", depths=_STAGES4, dims=_DIMS4)),
    # CoaT's conv relative position encoding splits the heads 2/3/3, so it needs 8 heads.
    "timm_coat": _timm(
        "stages",
        32,
        _create(
            "coat_lite_tiny", img_size=32, embed_dims=(32, 64, 64, 64), serial_depths=_STAGES4, mlp_ratios=(2, 2, 2, 2)
        ),
    ),
    "timm_twins": _timm(
        "stages",
        32,
        _create("twins_pcpvt_small", img_size=32, embed_dims=_DIMS4, depths=_STAGES4, num_heads=_HEADS4),
    ),
    "timm_edgenext": _timm("stages", 32, _create("edgenext_xx_small", depths=_STAGES4, dims=_DIMS4)),
    "timm_hiera": _timm(
        "stages", 64, _create("hiera_tiny_224", img_size=64, embed_dim=16, num_heads=1, stages=_STAGES4)
    ),
    "timm_focalnet": _timm(
        "stages", 32, _timm_class("focalnet", "FocalNet", depths=_STAGES4, embed_dim=16, drop_path_rate=0.0)
    ),
    "timm_volo": _timm(
        "stages",
        32,
        _timm_class("volo", "VOLO", img_size=32, layers=_STAGES4, embed_dims=(32, 64, 64, 64), num_heads=(1, 2, 2, 2)),
    ),
    # Two branches (small and large patches) with cross-attention between them.
    "timm_crossvit": _timm(
        "stages",
        32,
        _create(
            "crossvit_tiny_240",
            img_size=(32, 32),
            patch_size=(8, 16),
            embed_dim=(32, 64),
            depth=((2, 2, 0),),
            num_heads=(2, 2),
            mlp_ratio=(2, 2, 1),
        ),
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
# transformers


def _hf(
    model: str,
    config: str,
    kind: str,
    inputs: Callable[[int], dict[str, torch.Tensor]],
    output: Callable[[Any], torch.Tensor] = _logits,
    causal_lm: bool = False,
    **config_kwargs: Any,
) -> ZooEntry:
    def factory() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config)(attn_implementation="eager", **config_kwargs)
        return getattr(transformers, model)(cfg)

    return ZooEntry(
        build=_seeded(factory), inputs=inputs, kind=kind, family="transformers", causal_lm=causal_lm, output=output
    )


_TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
_BERT = {**_TINY, "max_position_embeddings": 32, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
_DECODER = {**_TINY, "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_GQA = {"num_key_value_heads": 2}
_BART = {
    "vocab_size": VOCAB,
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "max_position_embeddings": 32,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "decoder_layerdrop": 0.0,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
}
_VISION = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
_SPEECH = {
    **_TINY,
    "vocab_size": 32,
    "conv_dim": (16, 16),
    "conv_stride": (5, 4),
    "conv_kernel": (10, 8),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    "hidden_dropout": 0.0,
    "activation_dropout": 0.0,
    "attention_dropout": 0.0,
    "feat_proj_dropout": 0.0,
    "final_dropout": 0.0,
    "layerdrop": 0.0,
    "mask_time_prob": 0.0,
    "mask_feature_prob": 0.0,
}
_TOWER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def _towers(vocab: int = VOCAB) -> dict[str, Any]:
    return {
        "text_config": {
            **_TOWER,
            "vocab_size": vocab,
            "max_position_embeddings": 16,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        "vision_config": {**_TOWER, "image_size": 32, "patch_size": 8},
    }


HF_ZOO: dict[str, ZooEntry] = {
    "hf_bert": _hf("BertForSequenceClassification", "BertConfig", "single", _token_inputs(), **_BERT),
    "hf_roberta": _hf(
        "RobertaForSequenceClassification",
        "RobertaConfig",
        "single",
        _token_inputs(),
        **{**_BERT, "max_position_embeddings": 34},
    ),
    "hf_distilbert": _hf(
        "DistilBertForSequenceClassification",
        "DistilBertConfig",
        "single",
        _token_inputs(),
        vocab_size=VOCAB,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=64,
        max_position_embeddings=32,
        dropout=0.0,
        attention_dropout=0.0,
        seq_classif_dropout=0.0,
    ),
    "hf_electra": _hf(
        "ElectraForSequenceClassification", "ElectraConfig", "single", _token_inputs(), embedding_size=32, **_BERT
    ),
    "hf_deberta_v2": _hf(
        "DebertaV2ForSequenceClassification",
        "DebertaV2Config",
        "single",
        _token_inputs(),
        relative_attention=True,
        position_buckets=8,
        max_relative_positions=16,
        pos_att_type=["p2c", "c2p"],
        pooler_dropout=0.0,
        **_BERT,
    ),
    "hf_albert": _hf(
        "AlbertForSequenceClassification",
        "AlbertConfig",
        "shared",
        _token_inputs(),
        embedding_size=16,
        classifier_dropout_prob=0.0,
        **_BERT,
    ),
    "hf_gpt2": _hf(
        "GPT2LMHeadModel",
        "GPT2Config",
        "conv1d",
        _token_inputs(),
        causal_lm=True,
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "hf_llama": _hf("LlamaForCausalLM", "LlamaConfig", "single", _token_inputs(), causal_lm=True, **_DECODER, **_GQA),
    "hf_mistral": _hf(
        "MistralForCausalLM", "MistralConfig", "single", _token_inputs(), causal_lm=True, **_DECODER, **_GQA
    ),
    "hf_qwen2": _hf("Qwen2ForCausalLM", "Qwen2Config", "single", _token_inputs(), causal_lm=True, **_DECODER, **_GQA),
    "hf_gemma": _hf(
        "GemmaForCausalLM", "GemmaConfig", "single", _token_inputs(), causal_lm=True, head_dim=8, **_DECODER, **_GQA
    ),
    "hf_phi3": _hf("Phi3ForCausalLM", "Phi3Config", "fused", _token_inputs(), causal_lm=True, **_DECODER, **_GQA),
    "hf_gpt_neox": _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", "fused", _token_inputs(), causal_lm=True, **_DECODER),
    "hf_falcon": _hf(
        "FalconForCausalLM",
        "FalconConfig",
        "fused",
        _token_inputs(),
        causal_lm=True,
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "hf_opt": _hf(
        "OPTForCausalLM",
        "OPTConfig",
        "single",
        _token_inputs(),
        causal_lm=True,
        vocab_size=VOCAB,
        hidden_size=32,
        word_embed_proj_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        layerdrop=0.0,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    ),
    "hf_mixtral": _hf(
        "MixtralForCausalLM",
        "MixtralConfig",
        "moe",
        _token_inputs(),
        causal_lm=True,
        num_local_experts=4,
        num_experts_per_tok=2,
        **_DECODER,
        **_GQA,
    ),
    "hf_qwen2_moe": _hf(
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        "moe",
        _token_inputs(),
        causal_lm=True,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        **_DECODER,
        **_GQA,
    ),
    "hf_t5": _hf(
        "T5ForConditionalGeneration",
        "T5Config",
        "encoder-decoder",
        _seq2seq_inputs,
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    ),
    "hf_bart": _hf("BartForConditionalGeneration", "BartConfig", "encoder-decoder", _seq2seq_inputs, **_BART),
    "hf_marian": _hf(
        "MarianMTModel",
        "MarianConfig",
        "encoder-decoder",
        _seq2seq_inputs,
        **{**_BART, "decoder_vocab_size": VOCAB, "pad_token_id": 3, "decoder_start_token_id": 3, "eos_token_id": 0},
    ),
    "hf_whisper": _hf(
        "WhisperForConditionalGeneration",
        "WhisperConfig",
        "speech",
        _whisper_inputs,
        vocab_size=VOCAB,
        num_mel_bins=16,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=8,
        max_target_positions=16,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    ),
    "hf_wav2vec2": _hf("Wav2Vec2ForCTC", "Wav2Vec2Config", "speech", _audio_inputs, **_SPEECH),
    "hf_hubert": _hf("HubertForCTC", "HubertConfig", "speech", _audio_inputs, **_SPEECH),
    "hf_ast": _hf(
        "ASTForAudioClassification",
        "ASTConfig",
        "speech",
        _ast_inputs,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        patch_size=4,
        frequency_stride=4,
        time_stride=4,
        num_mel_bins=16,
        max_length=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=NUM_CLASSES,
    ),
    "hf_vit": _hf(
        "ViTForImageClassification", "ViTConfig", "single", _image_inputs(32), num_labels=NUM_CLASSES, **_VISION
    ),
    "hf_dinov2": _hf("Dinov2Model", "Dinov2Config", "single", _image_inputs(32), output=_hidden, **_VISION),
    "hf_beit": _hf(
        "BeitForImageClassification",
        "BeitConfig",
        "single",
        _image_inputs(32),
        use_relative_position_bias=True,
        drop_path_rate=0.0,
        num_labels=NUM_CLASSES,
        **_VISION,
    ),
    "hf_swin": _hf(
        "SwinForImageClassification",
        "SwinConfig",
        "windows",
        _image_inputs(32),
        image_size=32,
        patch_size=4,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
        hidden_dropout_prob=0.0,
        drop_path_rate=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=NUM_CLASSES,
    ),
    "hf_convnext": _hf(
        "ConvNextForImageClassification",
        "ConvNextConfig",
        "stages",
        _image_inputs(32),
        num_stages=2,
        hidden_sizes=[16, 32],
        depths=[2, 2],
        num_labels=NUM_CLASSES,
    ),
    "hf_resnet": _hf(
        "ResNetForImageClassification",
        "ResNetConfig",
        "stages",
        _image_inputs(32),
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[2, 2],
        layer_type="basic",
        num_labels=NUM_CLASSES,
    ),
    "hf_segformer": _hf(
        "SegformerForSemanticSegmentation",
        "SegformerConfig",
        "stages",
        _image_inputs(32),
        num_encoder_blocks=2,
        depths=[2, 2],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=32,
        drop_path_rate=0.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0,
        num_labels=NUM_CLASSES,
    ),
    "hf_clip": _hf(
        "CLIPModel",
        "CLIPConfig",
        "vision-language",
        _image_text_inputs(32),
        output=lambda out: out.logits_per_image,
        projection_dim=32,
        **_towers(),
    ),
    "hf_siglip": _hf(
        "SiglipModel",
        "SiglipConfig",
        "vision-language",
        _image_text_inputs(32),
        output=lambda out: out.logits_per_image,
        **_towers(),
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
# plain torch


class Attention(nn.Module):
    """Multi-head self-attention with separate query/key/value/output projections."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, dim)
        self.wv = nn.Linear(dim, dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.wq(x)), heads(self.wk(x)), heads(self.wv(x))
        attn = (q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)).softmax(dim=-1)
        return self.wo((attn @ v).transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# A user's own block declares its layout once; every method (Half Fine-Tuning, pruning, adapters) then reads it.
register_layout(
    Block,
    attention=[AttentionSpec("attn", q="attn.wq", k="attn.wk", v="attn.wv", o="attn.wo")],
    mlp=[MlpSpec(up=["mlp.up"], down="mlp.down", module="mlp")],
)


class UserModel(nn.Module):
    """A hand-written transformer classifier over (batch, seq, features) inputs."""

    def __init__(self, features: int = USER_FEATURES, dim: int = 32, depth: int = 2, n_heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads, 2 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


class TorchEncoderModel(nn.Module):
    """A classifier around ``nn.TransformerEncoder``."""

    def __init__(self, features: int = USER_FEATURES, dim: int = 32, depth: int = 2, n_heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        layer = nn.TransformerEncoderLayer(dim, n_heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


TORCH_ZOO: dict[str, ZooEntry] = {
    "torch_encoder": ZooEntry(build=_seeded(TorchEncoderModel), inputs=_features_inputs, kind="single", family="torch"),
    "torch_user": ZooEntry(build=_seeded(UserModel), inputs=_features_inputs, kind="user", family="torch"),
}

ZOO: dict[str, ZooEntry] = {**TIMM_ZOO, **HF_ZOO, **TORCH_ZOO}


# ---------------------------------------------------------------------------------------------------------------------
# self-check


def check(name: str, entry: ZooEntry) -> str:
    """Build, run forward/backward, ``generate`` for causal LMs, check training-mode determinism; return a summary."""
    start = time.perf_counter()
    model = entry.build()
    built = time.perf_counter() - start
    inputs = entry.inputs(2)
    start = time.perf_counter()
    out = entry.output(model(**inputs))
    forward = time.perf_counter() - start
    if not out.is_floating_point():
        raise TypeError(f"output is {out.dtype}, not floating")
    if not torch.isfinite(out).all():
        raise ValueError("output is not finite")
    out.float().pow(2).mean().backward()
    if entry.causal_lm:
        ids = inputs["input_ids"]
        generated = model.generate(ids, max_new_tokens=2, do_sample=False)
        if generated.shape != (ids.shape[0], ids.shape[1] + 2):
            raise ValueError(f"generate returned shape {tuple(generated.shape)}")
    # Dropout, drop-path and layer-drop are all off, so training-mode forwards do not depend on the RNG state.
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        first = entry.output(model(**inputs))
        torch.manual_seed(2)
        if not torch.equal(first, entry.output(model(**inputs))):
            raise ValueError("training-mode forward is not deterministic")
    params = sum(p.numel() for p in model.parameters())
    return f"build {built:5.2f}s  forward {forward:5.2f}s  params {params / 1e3:8.1f}k  out {tuple(out.shape)}"


if __name__ == "__main__":
    import timm  # noqa: F401 - imported up front so that the first build's time is the model's own
    from transformers import PreTrainedModel  # noqa: F401

    torch.set_num_threads(1)  # the models are tiny: extra threads only add overhead on a shared machine
    failed = []
    total = time.perf_counter()
    for name, entry in ZOO.items():
        try:
            summary = check(name, entry)
            print(f"ok    {name:20s} {entry.kind:16s} {summary}")
        except Exception as err:  # noqa: BLE001 - report every failure, then raise
            failed.append(name)
            print(f"FAIL  {name:20s} {entry.kind:16s} {type(err).__name__}: {err}")
    print(f"{len(ZOO) - len(failed)}/{len(ZOO)} entries passed in {time.perf_counter() - total:.1f}s")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")
