"""The ready LightningModules check their plain arguments before building a network, in one wording.

Each error names the argument in backticks, says what is allowed and what was got, and ends with a HINT (the checks
of :mod:`lightning_peft._validation`); a bool is never taken for a number or a flag for a string.
"""

import pytest

from lightning_peft.modules import AudioClassifier, CausalLM, ImageClassifier, TextClassifier

VIT = {"model_name": "vit_tiny_patch16_224", "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}
LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}

CASES = [
    (ImageClassifier, {**VIT, "num_classes": True}, ValueError, r"`num_classes` must be an integer >= 2 \(one output"),
    (ImageClassifier, {**VIT, "num_classes": 4, "pretrained": "no"}, ValueError, r"`pretrained` must be True or False"),
    (ImageClassifier, {**VIT, "num_classes": 4, "optimizer": None}, TypeError, r"`optimizer` must be a callable"),
    (AudioClassifier, {"num_classes": 3, "builder": "torchaudio"}, ValueError, r"`builder` must be one of \['timm'"),
    (AudioClassifier, {"num_classes": 3, "fstride": 0}, ValueError, r"`fstride` must be an integer >= 1, got 0"),
    (AudioClassifier, {"num_classes": 3, "num_mel_bins": 12.5}, ValueError, r"`num_mel_bins` must be an integer"),
    (AudioClassifier, {"num_classes": 3, "pretrained": 1}, ValueError, r"`pretrained` must be True or False, got 1"),
    (TextClassifier, {"model": "m", "num_labels": 2.0}, ValueError, r"`num_labels` must be an integer >= 2"),
    (CausalLM, {"config": LLAMA, "scheduler": "cosine"}, TypeError, r"`scheduler` must be None or a callable"),
]


@pytest.mark.parametrize(("factory", "kwargs", "error", "match"), CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_argument_is_named_with_what_is_allowed_and_a_hint(factory, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        factory(**kwargs)
    assert "HINT: " in str(info.value) and ", got " in str(info.value)
