"""The benchmarks of lightning_peft: one experiment per module, run from the repository root as
``python -m benchmarks.<name>`` (``memory``, ``fidelity``, ``pruning``, ...).

Shared code lives in :mod:`benchmarks.harness` (byte counters, the measuring callback, the environment, the result
writers), :mod:`benchmarks.peers` (how the peer methods are built), :mod:`benchmarks.recipes` (what one run trains)
and :mod:`benchmarks.causal_lm` (the causal-LM benchmark's pretrained model, data and perplexity); the scripts
import those, never each other's internals. Results go to ``benchmarks/results/``.
"""
