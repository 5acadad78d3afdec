"""What early pruning measures before it cuts: head / neuron masks, PEFT importance, and the check of every site.

:class:`Estimation` gathers the instruments on one model -- :class:`~lightning_peft.pruning.PruningMasks` (trained
with the model, scored by magnitude or Taylor), :class:`~lightning_peft.pruning.LoraImportance` and
:class:`~lightning_peft.pruning.AdapterImportance`, and a :class:`~lightning_peft.pruning.verify.SiteVerifier` that
proves on copies of the blocks that each site can be cut -- with their checkpoint state, so a callback only says
when a step starts and ends.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_peft.adapters import adapter_modules
from lightning_peft.layout import find_blocks
from lightning_peft.pruning.adapter_importance import AdapterImportance
from lightning_peft.pruning.masks import PruningMasks
from lightning_peft.pruning.peft_importance import LoraImportance
from lightning_peft.pruning.surgery import Sites, find_lora_layers
from lightning_peft.pruning.verify import SiteVerifier

__all__ = ["MASKS", "Estimation"]

MASKS = "early_pruning_masks"  # the masks' attribute on the root module (so an optimizer over it includes them)


class Estimation:
    """The estimation's instruments on one model, installed, with their state.

    Args:
        root: the model (a LightningModule): the masks are registered on it as ``early_pruning_masks``, before its
            optimizer is built, so they train with everything else.
        sites: the attention / MLP sites whose heads / neurons get masks (none: no masks).
        peft: whether LoRA layers and adapters are scored.
        layers: the block container path(s) (``layers=`` of :func:`~lightning_peft.layout.find_blocks`).
        state: :meth:`state_dict` output of an earlier run to continue from.

    Example::

        >>> import timm
        >>> from lightning_peft.pruning import find_sites
        >>> vit = timm.create_model("vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=4, pretrained=False)
        >>> estimation = Estimation(vit, find_sites(vit), peft=True)
        >>> [len(m) for m in estimation.masks.heads], estimation.lora is None
        ([4, 4], True)
        >>> _ = estimation.remove(vit)
    """

    def __init__(
        self,
        root: nn.Module,
        sites: Sites,
        peft: bool,
        layers: str | list[str] | None = None,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.layers = layers
        self.masks = PruningMasks(sites) if sites.attention or sites.mlp else None
        self.lora = LoraImportance(root) if peft and find_lora_layers(root) else None
        self.adapters = AdapterImportance(root) if peft and adapter_modules(root) else None
        self.excluded: dict[str, str] = {}  # sites whose pruned copy did not match the masked one: left whole
        self._verifier: SiteVerifier | None = None
        if self.masks is not None:
            root.add_module(MASKS, self.masks)
            self.masks.install()
        for importance in self.importances():
            importance.install()
        if state:
            self.load_state_dict(state)

    @property
    def empty(self) -> bool:
        """Whether nothing is measured (no site and no PEFT module)."""
        return self.masks is None and not self.importances()

    def importances(self) -> list[LoraImportance | AdapterImportance]:
        """The PEFT importance trackers in use."""
        return [i for i in (self.lora, self.adapters) if i is not None]

    def begin_step(self, root: nn.Module, score_peft: bool) -> None:
        """Before a training step: record the blocks' inputs once (for :meth:`end_step`); score PEFT if asked."""
        if self.masks is not None and self._verifier is None and not self.excluded:
            # record one block of each class in this forward; prove its pruning on a copy after the step
            stack = find_blocks(root, self.layers)
            sites = Sites(attention=self.masks.attention_sites, mlp=self.masks.mlp_sites)
            self._verifier = SiteVerifier(stack.names, stack.blocks, sites)
            self._verifier.start()
        for importance in self.importances():
            importance.recording = score_peft

    def end_step(self) -> dict[str, str]:
        """After a training step: stop scoring; after the first, verify every site. Returns sites found unsound."""
        for importance in self.importances():
            importance.recording = False  # validation passes do not count
        if self._verifier is None or not self._verifier.pending:
            return {}
        self._verifier.stop()
        if self.masks is not None:
            self.masks.remove()  # the block copies must not carry the masks' hooks
        self.excluded = self._verifier.verify()
        if self.masks is not None:
            self.masks.install()
        return self.excluded

    def before_optimizer_step(self, score: bool, l1: float) -> None:
        """With the step's gradients: add the Taylor and rank scores (if ``score``), then the masks' L1 gradient."""
        if self.masks is not None:
            if score:
                self.masks.record_taylor()  # the loss gradient alone, before the L1 term joins it
            if l1:
                self.masks.l1_gradient(l1)
        if score:
            for importance in self.importances():
                importance.record_ranks()

    def unit_scores(self, score: str) -> tuple[list[Tensor], list[Tensor]]:
        """Head and neuron scores per site: mean Taylor (``"taylor"``, once recorded) or ``|m|``."""
        assert self.masks is not None
        if score == "taylor" and self.masks.taylor_count:
            return self.masks.taylor_scores()
        return self.masks.magnitude_scores()

    def remove(self, root: nn.Module) -> list[Tensor]:
        """Take every instrument off ``root``; return the mask parameters (they leave the optimizer)."""
        dropped: list[Tensor] = []
        if self.masks is not None:
            self.masks.remove()
            dropped = list(self.masks.parameters())
            if MASKS in dict(root.named_children()):
                delattr(root, MASKS)
            self.masks = None
        for importance in self.importances():
            importance.remove()
        self.lora = self.adapters = None
        return dropped

    def state_dict(self) -> dict[str, Any]:
        """The Taylor sums of the masks and the PEFT scores (a checkpoint written during estimation)."""
        return {
            "taylor": None if self.masks is None else self.masks.taylor_state(),
            "importance": None if self.lora is None else self.lora.state_dict(),
            "adapter_importance": None if self.adapters is None else self.adapters.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (parts the model has no instrument for are ignored)."""
        for tracker, key, load in (
            (self.masks, "taylor", "load_taylor_state"),
            (self.lora, "importance", "load_state_dict"),
            (self.adapters, "adapter_importance", "load_state_dict"),
        ):
            if tracker is not None and state.get(key) is not None:
                getattr(tracker, load)(state[key])
