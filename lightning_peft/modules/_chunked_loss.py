"""Next-token cross-entropy over the LM head in chunks of tokens, so the ``tokens x vocab`` logits never exist whole.

Each chunk's head projection and cross-entropy run inside a non-reentrant ``torch.utils.checkpoint``: forward keeps
only the chunk's hidden states (a view of the backbone's output) and recomputes the chunk's logits in backward, so
the logits and their gradient are held one chunk at a time, in forward and in backward. The numbers are those of
transformers' ``ForCausalLMLoss``: labels shifted left, logits upcast to float32, positions labelled ``-100``
ignored, the sum divided by the number of counted positions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["IGNORE_INDEX", "chunked_next_token_loss"]

IGNORE_INDEX = -100


def recompute_in_backward(function: Callable[..., Tensor], *args: Any) -> Tensor:
    """``function(*args)`` under a non-reentrant checkpoint: only its inputs are kept, the rest rebuilt in backward.

    One name for the memory estimate to find (:func:`lightning_peft.estimate.estimate_memory` counts what one chunk
    saves as rebuilt at the start of backward).
    """
    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False)


def _chunk_loss_sum(head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor) -> Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_next_token_loss(
    hidden: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor, chunk_size: int
) -> Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` against ``labels``, ``chunk_size`` tokens at a time.

    Args:
        hidden: the backbone's last hidden states ``(B, T, H)``.
        head: the LM head (tied or not, LoRA-wrapped or not): maps ``(N, H)`` to ``(N, vocab)`` logits.
        labels: ``(B, T)`` token ids; ``-100`` marks positions without a target. Shifted here, as transformers does.
        chunk_size: tokens per chunk (>= 1).

    Returns:
        The scalar loss (NaN when no position has a target, as transformers gives).

    Example::

        >>> head = torch.nn.Linear(4, 10)
        >>> hidden, labels = torch.randn(2, 6, 4), torch.randint(0, 10, (2, 6))
        >>> full = F.cross_entropy(head(hidden)[:, :-1].reshape(-1, 10), labels[:, 1:].reshape(-1))
        >>> torch.allclose(chunked_next_token_loss(hidden, head, labels, 4), full)
        True
    """
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    counted = (targets != IGNORE_INDEX).sum()
    recompute = torch.is_grad_enabled()
    total = None
    for start in range(0, flat.shape[0], chunk_size):
        part, part_targets = flat[start : start + chunk_size], targets[start : start + chunk_size]
        if recompute:
            value = recompute_in_backward(_chunk_loss_sum, head, part, part_targets)
        else:
            value = _chunk_loss_sum(head, part, part_targets)
        total = value if total is None else total + value
    assert total is not None
    return total / counted
