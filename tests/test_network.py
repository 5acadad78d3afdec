"""Nothing waits on the network unless the user asked for a download.

The child processes load ``tests/network_sim/sitecustomize.py``: it records every socket connection attempt and
name look-up, can make each fail (no network at all), and makes bitsandbytes believe the CPU has AVX512-BF16 — the
case where importing it (through peft, so through every command) asks the Hugging Face hub for a kernel.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIMULATION = ROOT / "tests" / "network_sim"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


class NeverAnsweringProxy:
    """A local TCP server that accepts connections and never sends a byte (a proxy or firewall swallowing packets)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:  # closed
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.server.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture
def proxy():
    server = NeverAnsweringProxy()
    yield f"http://127.0.0.1:{server.port}"
    server.close()


def _run(
    code_or_args: list[str],
    tmp_path: Path,
    name: str,
    offline: bool,
    proxy_url: str | None = None,
    timeout: float = 240,
) -> tuple[subprocess.CompletedProcess, list[str], float]:
    log = tmp_path / f"{name}.network.log"
    env = {k: v for k, v in os.environ.items() if k.upper() not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(SIMULATION), str(ROOT)]),
        NETWORK_SIM_LOG=str(log),
        NETWORK_SIM_OFFLINE="1" if offline else "0",
    )
    for key in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(key, None)
        if proxy_url is not None and key.lower() != "all_proxy":
            env[key] = proxy_url
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    started = time.perf_counter()
    try:
        result = subprocess.run(
            [sys.executable, *code_or_args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        attempts = log.read_text().splitlines() if log.exists() else []
        pytest.fail(f"{name}: still running after {timeout:.0f} s; network attempts: {attempts[:5]}; output: {err}")
    elapsed = time.perf_counter() - started
    attempts = log.read_text().splitlines() if log.exists() else []
    return result, attempts, elapsed


def test_the_simulation_shows_the_hub_lookup_of_a_plain_bitsandbytes_import(tmp_path):
    # Without our import hook, bitsandbytes' import reaches for the hub: the simulation is what the tests below rely
    # on, so it must show the problem they guard against. (peft imports bitsandbytes eagerly in some releases and
    # lazily in others: the tests import it by name.)
    result, attempts, _ = _run(["-c", "import bitsandbytes"], tmp_path, "plain", offline=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert any("huggingface.co" in attempt for attempt in attempts), attempts


def test_importing_the_package_first_makes_bitsandbytes_import_local(tmp_path, proxy):
    code = (
        "import logging, sys, lightning_peft, peft, bitsandbytes, huggingface_hub.constants as hub\n"
        "assert 'bitsandbytes' in sys.modules\n"
        "assert not any(type(f).__name__ == '_OfflineImportFinder' for f in sys.meta_path), 'hook left installed'\n"
        "print('hub offline after import:', hub.HF_HUB_OFFLINE)\n"
        "print('levels:', logging.getLogger('bitsandbytes').level, logging.getLogger('kernels').level)\n"
    )
    result, attempts, elapsed = _run(["-c", code], tmp_path, "hooked", offline=False, proxy_url=proxy, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert attempts == []
    # Nothing of the hook stays behind: the hub is online again for what the user asks, loggers as they were.
    assert "hub offline after import: False" in result.stdout
    assert "levels: 0 0" in result.stdout
    assert "Failed" not in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_quickstart_behind_a_silent_proxy_and_without_network(tmp_path, proxy):
    args = [
        "-c",
        "from lightning_peft.cli import cli_main; cli_main()",
        "fit",
        "--config",
        str(QUICKSTART),
        "--trainer.limit_train_batches",
        "3",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.callbacks",
        "[]",
    ]
    offline, offline_attempts, offline_time = _run(args, tmp_path, "no-network", offline=True)
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert offline_attempts == []
    assert "val/acc" in offline.stdout + offline.stderr
    proxied, proxied_attempts, proxied_time = _run(
        args, tmp_path, "proxy", offline=False, proxy_url=proxy, timeout=max(240.0, 3 * offline_time)
    )
    assert proxied.returncode == 0, proxied.stderr[-3000:]
    assert proxied_attempts == []
    # The hang this guards against lasts minutes; 10 s of slack absorbs a busy 2-core machine's noise.
    assert proxied_time <= 1.5 * offline_time + 10, (proxied_time, offline_time)
