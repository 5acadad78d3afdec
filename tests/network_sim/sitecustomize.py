"""Loaded by the child processes of tests/test_network.py (this folder first on PYTHONPATH).

- Every socket connection attempt and name look-up is appended to the file named by ``NETWORK_SIM_LOG``; with
  ``NETWORK_SIM_OFFLINE=1`` each also fails, as on a machine with no network at all.
- bitsandbytes is made to believe the CPU has AVX512-BF16, the case where its import asks the Hugging Face hub for a
  kernel, so the test means the same on every CPU.
"""

import importlib.abc
import importlib.util
import os
import socket
import sys

_LOG = os.environ.get("NETWORK_SIM_LOG")
_OFFLINE = os.environ.get("NETWORK_SIM_OFFLINE") == "1"


def _record(what):
    with open(_LOG, "a") as log:
        log.write(f"{what}\n")
    if _OFFLINE:
        raise OSError(101, "Network is unreachable (simulated)")


_connect = socket.socket.connect
_getaddrinfo = socket.getaddrinfo


def _connect_logged(self, address):
    _record(f"connect {address!r}")
    return _connect(self, address)


def _getaddrinfo_logged(host, *args, **kwargs):
    _record(f"getaddrinfo {host!r}")
    return _getaddrinfo(host, *args, **kwargs)




class _AVX512BF16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True

        spec.loader.exec_module = exec_module
        return spec


if _LOG is not None:  # only in the child processes of tests/test_network.py, never when merely imported
    socket.socket.connect = _connect_logged
    socket.getaddrinfo = _getaddrinfo_logged
    sys.meta_path.insert(0, _AVX512BF16())
