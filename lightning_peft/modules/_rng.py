"""The global random generators' states as plain data, so a checkpoint resumes dropout and augmentation exactly."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def collect_rng_states() -> dict[str, Any]:
    """The states of the global generators (torch, CUDA, numpy, random) as plain data (``weights_only`` loads it).

    Example::

        >>> states = collect_rng_states()
        >>> first = torch.rand(2)
        >>> restore_rng_states(states)
        >>> torch.equal(torch.rand(2), first)
        True
    """
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), position, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Set the global generators to states from :func:`collect_rng_states` (missing entries are left alone).

    Example::

        >>> restore_rng_states(collect_rng_states())  # continue exactly where the states were taken
    """
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "numpy" in states:
        kind, keys, position, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
