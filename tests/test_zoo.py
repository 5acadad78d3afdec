"""The support matrix: every method on every architecture of the zoo, each cell checking what the method promises.

A cell is OK (or partial, naming what it leaves out) or a clear refusal (a message with a HINT); never a crash or a
silent error. ``benchmarks/support_matrix.py`` writes the same cells into the README.
"""

import pytest
from zoo_models import ZOO

from lightning_peft.support import check_support, supported_methods

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]

# What must hold on the architectures named in the issue this matrix answers (not just "no crash").
EXPECTED = {
    ("timm_resnet", "lisa"): "ok",
    ("hf_t5", "lisa"): "ok",
    ("hf_bart", "lisa"): "ok",
    ("hf_albert", "lisa"): "refused",
    ("hf_albert", "ist"): "refused",
    ("hf_albert", "hft"): "ok",
    **{(name, "early_pruning"): "ok" for name in ("timm_swin", "hf_swin", "hf_gpt2", "hf_whisper")},
    ("hf_t5", "early_pruning"): "partial",  # MLPs of both stacks pruned; heads share the first layer's position bias
    # heads left whole with the reason (their forward reshapes to the input width), MLP neurons and LoRA pruned
    ("timm_beit", "early_pruning"): "partial",
    ("timm_eva02", "early_pruning"): "partial",
    ("hf_bart", "early_pruning"): "ok",
    ("hf_phi3", "early_pruning"): "ok",
    ("torch_user", "early_pruning"): "ok",  # a user's block with its layout declared once
}


def test_zoo_is_large_enough():
    families = [entry.family for entry in ZOO.values()]
    assert families.count("timm") >= 20 and families.count("transformers") >= 25
    kinds = {entry.kind for entry in ZOO.values()}
    assert {"single", "stages", "windows", "encoder-decoder", "moe", "shared", "fused", "conv1d", "speech"} <= kinds
    assert {"vision-language", "user"} <= kinds


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_method_is_ok_or_refuses_clearly(name):
    entry = ZOO[name]
    results = check_support(entry.build, entry.inputs(2), entry.output, entry.causal_lm)
    assert [r.method for r in results] == list(supported_methods())
    failures = [f"{r.method}: {r.detail}" for r in results if r.status == "fail"]
    assert not failures, failures
    for result in results:
        if result.status == "refused":
            assert "HINT" in result.detail
        expected = EXPECTED.get((name, result.method))
        if expected is not None:
            assert result.status == expected, (result.method, result.detail)
