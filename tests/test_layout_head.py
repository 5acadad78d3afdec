"""find_head: the output head of timm, transformers, peft-wrapped, Lightning-wrapped and plain models, from a table."""

import pytest
import timm
import torch
from helpers import tiny_transformer
from torch import nn

from lightning_peft.layout import find_head

TIMM_TINY = {"pretrained": False, "num_classes": 3}


def _timm(name, **kwargs):
    return lambda: timm.create_model(name, **{**TIMM_TINY, **kwargs})


def _peft(build, target_modules, modules_to_save=None, task_type=None):
    def wrapped():
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=2, target_modules=target_modules, modules_to_save=modules_to_save, task_type=task_type)
        return get_peft_model(build(), config)

    return wrapped


def _image_classifier():
    from lightning_peft.modules import ImageClassifier

    return ImageClassifier("vit_tiny_patch16_224", 3, model_kwargs={"img_size": 32, "patch_size": 8, "depth": 1})


def _timm_ast():
    from lightning_peft.models import build_timm_ast

    kwargs = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    return build_timm_ast("deit_tiny_distilled_patch16_224", num_classes=3, target_length=32, backbone_kwargs=kwargs)


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.head = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2))  # "head.1" lies inside: only "head" is named


CASES = [
    # timm declares its classifier in pretrained_cfg (one name, a nested one, or a pair)
    ("timm vit", _timm("vit_tiny_patch16_224", depth=1), ["head"]),
    ("timm deit distilled", _timm("deit_tiny_distilled_patch16_224", depth=1), ["head", "head_dist"]),
    ("timm convnext", _timm("convnext_atto"), ["head.fc"]),
    ("timm resnet", _timm("resnet18"), ["fc"]),
    ("timm efficientnet", _timm("efficientnet_b0"), ["classifier"]),
    ("timm headless backbone", _timm("vit_tiny_patch16_224", depth=1, num_classes=0), ["head"]),  # an Identity
    # transformers: LMs declare get_output_embeddings(); sequence classifiers are found by name
    ("hf llama causal lm", lambda: tiny_transformer("llama"), ["lm_head"]),
    ("hf bert classifier", lambda: tiny_transformer("bert"), ["classifier"]),
    ("hf llama classifier", lambda: _hf_llama_classifier(), ["score"]),
    ("hf ast", lambda: tiny_transformer("ast"), ["classifier"]),
    ("hf llama without head", lambda: tiny_transformer("llama", bare=True), []),
    # wrappers: peft (the saved copy keeps the name), a LightningModule, the timm AST of lightning_peft.models
    ("peft timm vit", _peft(_timm("vit_tiny_patch16_224", depth=1), ["qkv"], ["head"]), ["base_model.model.head"]),
    ("peft llama lm", _peft(lambda: tiny_transformer("llama"), ["q_proj"]), ["base_model.model.lm_head"]),
    (
        "peft bert seq cls",
        _peft(lambda: tiny_transformer("bert"), ["query"], task_type="SEQ_CLS"),
        ["base_model.model.classifier"],
    ),
    ("ImageClassifier", _image_classifier, ["model.head"]),
    ("timm AST (get_classifier)", _timm_ast, ["head"]),
    # plain modules: by name, outermost only; none when nothing is named like a head
    ("plain module", _Plain, ["head"]),
    ("no head", lambda: nn.Sequential(nn.Linear(2, 2)), []),
]


def _hf_llama_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64, num_labels=3
    )
    return LlamaForSequenceClassification(config)


@pytest.mark.parametrize(("build", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_find_head(build, expected):
    torch.manual_seed(0)
    model = build()
    names = find_head(model)
    assert names == expected
    modules = dict(model.named_modules())
    assert all(name in modules for name in names)
