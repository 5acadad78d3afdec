"""The model builders check their plain arguments before building, in one wording (see lightning_peft._validation)."""

import pytest

from lightning_peft.models import build_hf_ast, build_timm_ast
from lightning_peft.models.ast import ast_patch_grid

CASES = [
    (build_timm_ast, {"backbone": "vit_tiny_patch16_224", "num_classes": 0}, r"`num_classes` must be an integer >= 1"),
    (build_timm_ast, {"backbone": "vit_tiny_patch16_224", "tstride": True}, r"`tstride` must be an integer >= 1"),
    (build_timm_ast, {"backbone": "vit_tiny_patch16_224", "pretrained": "yes"}, r"`pretrained` must be True or False"),
    (build_hf_ast, {"config": {}, "num_labels": 0}, r"`num_labels` must be None or an integer >= 1, got 0"),
    (build_hf_ast, {"config": {}, "max_length": -5}, r"`max_length` must be None or an integer >= 1, got -5"),
    (
        ast_patch_grid,
        {"num_mel_bins": 8, "target_length": 64, "fstride": 10, "tstride": 10},
        r"`num_mel_bins` must be an integer >= 16 \(at least the patch size 16\), got 8",
    ),
    (ast_patch_grid, {"num_mel_bins": 128, "target_length": 64, "fstride": 0, "tstride": 10}, r"`fstride` must be"),
]


@pytest.mark.parametrize(("builder", "kwargs", "match"), CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_argument_is_named_with_what_is_allowed_and_a_hint(builder, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        builder(**kwargs)
    assert "HINT: " in str(info.value)
