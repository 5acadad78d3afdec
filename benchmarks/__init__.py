"""The benchmarks of lightning_peft: one experiment per module, run from the repository root as
``python -m benchmarks.<name>`` (``memory``, ``fidelity``, ``pruning``, ...).

Shared code lives in :mod:`benchmarks.harness` (byte counters, the measuring callback, the environment, the result
writers) and :mod:`benchmarks.peers` (how the peer methods are built); the scripts import those, never each other's
internals. Results go to ``benchmarks/results/``.
"""
