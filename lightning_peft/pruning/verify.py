"""Prove on a copy of a block that pruning it computes what masking it computes, before pruning the model.

The layout registry reads attribute names; a block whose forward derives shapes from something else (a width
hard-coded in ``forward``, a head count read from a config) would be sliced into a model that crashes or, worse,
computes something else. :class:`SiteVerifier` records the inputs of every block during a real training forward,
then for each site, on a deep copy of its block, compares the output with some heads or neurons masked against the
output with the same heads or neurons pruned. Sites that fail are left out of the plan (whole), with the reason.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft._compat import dropout_classes
from lightning_peft.layout import block_anatomy
from lightning_peft.pruning.masks import PruningMasks
from lightning_peft.pruning.plan import _sync_configs
from lightning_peft.pruning.surgery import Sites, prune_attention, prune_mlp

__all__ = ["SiteVerifier"]


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return getattr(value, "last_hidden_state", None) if not isinstance(value, (list, tuple)) else None


def _is_cache(value: Any) -> bool:
    return "cache" in type(value).__name__.lower()


def _without_caches(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    # a key/value cache passed along (by keyword or position) would grow with every verification forward
    args = tuple(None if _is_cache(a) else a for a in args)
    kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


class SiteVerifier:
    """Checks, site by site, that pruning a block computes what masking it computes.

    Args:
        names: dotted names of the blocks (as in the layer stack), relative to the root searched.
        blocks: the block modules.
        sites: the sites found in them.

    Example::

        >>> import timm, torch
        >>> from lightning_peft.layout import find_blocks
        >>> from lightning_peft.pruning import find_sites
        >>> vit = timm.create_model("vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=4, img_size=32)
        >>> stack = find_blocks(vit)
        >>> verifier = SiteVerifier(stack.names, stack.blocks, find_sites(vit))
        >>> verifier.start(); _ = vit(torch.randn(1, 3, 32, 32)); verifier.stop()
        >>> verifier.verify()
        {}
    """

    def __init__(self, names, blocks, sites: Sites) -> None:
        owned: dict[int, list[str]] = defaultdict(list)
        for site in (*sites.attention, *sites.mlp):
            owned[site.block].append(site.path)
        self._names = list(names)
        self._blocks = list(blocks)
        self._owned = dict(owned)
        self._inputs: dict[int, tuple[tuple, dict]] = {}
        self._handles: list = []

    def start(self) -> None:
        """Record the inputs of every block holding sites at its next forward."""
        for index in self._owned:
            self._handles.append(self._blocks[index].register_forward_pre_hook(self._recorder(index), with_kwargs=True))

    def _recorder(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if index not in self._inputs and torch.is_grad_enabled():  # the training forward, not a scoring pass
                detach = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
                self._inputs[index] = (tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()})

        return hook

    @property
    def pending(self) -> bool:
        """Whether recording hooks are installed (between :meth:`start` and :meth:`stop`)."""
        return bool(self._handles)

    def stop(self) -> None:
        """Remove the recording hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def verify(self) -> dict[str, str]:
        """``{site path: reason}`` of every site that cannot be pruned exactly (empty when all can).

        Each site is tried alone on a fresh copy of its block: some heads (a key/value group) or a third of the
        neurons masked, then the same pruned; the two outputs must agree. The copies carry the blocks' hooks, so
        remove :class:`~lightning_peft.pruning.PruningMasks` from the model first.
        """
        excluded: dict[str, str] = {}
        for index, paths in self._owned.items():
            for path in paths:
                reason = self._verify_site(index, path)
                if reason is not None:
                    excluded[path] = reason
        self._inputs.clear()
        return excluded

    def _verify_site(self, index: int, path: str) -> str | None:
        name, block = self._names[index], self._blocks[index]
        if index not in self._inputs:
            return f"{type(block).__name__} did not run in the training forward, so it could not be verified"
        args, kwargs = _without_caches(*self._inputs[index])
        trial = copy.deepcopy(block)  # with the block's hooks: adapters stay; remove pruning masks before verify()
        anatomy = block_anatomy(trial, name, index)
        sites = Sites(
            attention=[s for s in anatomy.attention if s.path == path and s.problem is None],
            mlp=[s for s in anatomy.mlp if s.path == path],
        )
        if not sites.attention and not sites.mlp:
            return f"the site is not found again in a copy of {type(block).__name__}"
        masks = PruningMasks(sites)
        kept_heads: list[int] = []
        with torch.no_grad():
            for site, mask in zip(masks.attention_sites, masks.heads, strict=True):
                group = site.group_size
                kept_heads = (
                    list(range(site.num_heads - group)) if site.num_kv_heads > 1 else list(range(1, site.num_heads))
                ) or list(range(site.num_heads))
                mask.zero_()
                mask[kept_heads] = 1
            for mask in masks.neurons:
                mask[::3] = 0
        # training mode without randomness: fused inference paths (nn.TransformerEncoderLayer's fast path) skip
        # module hooks, so the masks; the copy is thrown away, so its dropout can be switched off
        for module in trial.modules():
            for attribute, value in list(vars(module).items()):
                if "drop" in attribute and isinstance(value, float):
                    setattr(module, attribute, 0.0)
            if isinstance(module, dropout_classes()):
                module.p = 0.0
        was_training = trial.training
        trial.train()
        try:
            masks.install()
            expected = _first_tensor(trial(*args, **kwargs))
            masks.remove()
            for site in sites.attention:
                prune_attention(site, kept_heads)
            _sync_configs(sites.attention)  # the copy's own config (deep-copied with the block)
            for site, mask in zip(sites.mlp, masks.neurons, strict=True):
                prune_mlp(site, torch.nonzero(mask).flatten().tolist())
            got = _first_tensor(trial(*args, **kwargs))
        except Exception as error:  # the pruned copy does not run: that is the finding
            return f"a pruned copy of {type(block).__name__} fails ({type(error).__name__}: {str(error)[:120]})"
        finally:
            trial.train(was_training)
        if expected is None or got is None:
            return f"{type(block).__name__} returns no tensor to compare"
        expected, got = expected.detach().float(), got.detach().float()
        scale = float(expected.abs().max().clamp_min(1.0))
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-3 * scale, rtol=1e-3):
            return f"a pruned copy of {type(block).__name__} computes something else than the masked block"
        return None
