"""The output head of a model: the classifier or LM head that sits after every block.

:func:`find_head` prefers what the ecosystem declares, as :func:`~lightning_peft.layout.find_blocks` does for the
blocks:

1. timm: the model's ``pretrained_cfg["classifier"]`` (``"head"``, ``"head.fc"``, ``("head", "head_dist")``,
   ``"fc"``, ``"classifier"``), then its ``get_classifier()``;
2. transformers: ``get_output_embeddings()`` (a causal / masked LM's ``lm_head``);
3. names: the outermost modules named ``lm_head``, ``classifier``, ``score``, ``head`` or ``qa_outputs`` (a
   transformers ``...ForSequenceClassification`` declares no head; its ``classifier`` / ``score`` is found here).

Wrappers are looked through: a LightningModule holding the network as ``self.model``, an HF ``PeftModel`` (its
``modules_to_save`` copies keep the head's name), the timm AST of :mod:`lightning_peft.models`. Names are dotted
module paths of the model passed in, as in ``named_modules()``.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["HEAD_NAMES", "find_head"]

# Last name components of output heads, for models that declare none (transformers' task heads, plain nn.Modules).
HEAD_NAMES = ("lm_head", "classifier", "score", "head", "qa_outputs")


def _modules(value: object) -> list[nn.Module]:
    """The modules of what ``get_classifier()`` / ``get_output_embeddings()`` returned (one, a tuple, or None)."""
    if isinstance(value, nn.Module):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, nn.Module)]
    return []


def _named(modules: Iterable[nn.Module], names_of: dict[int, str]) -> list[str]:
    names = [names_of.get(id(module)) for module in modules]
    return [name for name in names if name] if names and all(names) else []


def _declared(root: nn.Module, names_of: dict[int, str]) -> list[str]:
    """The head that a timm or transformers model inside ``root`` declares (outermost declaration first)."""
    for prefix, module in root.named_modules():
        config = vars(module).get("pretrained_cfg")  # set on the timm model itself, not forwarded by wrappers
        declared = config.get("classifier") if isinstance(config, dict) else None
        if declared:
            paths = [declared] if isinstance(declared, str) else list(declared)
            full = [f"{prefix}.{p}" if prefix else p for p in paths]
            found = [name for name in full if name in names_of.values()]
            if found:
                return found
        for getter in ("get_classifier", "get_output_embeddings"):
            method = getattr(type(module), getter, None)  # the class's own method: wrappers' __getattr__ not asked
            if callable(method):
                try:
                    found = _named(_modules(method(module)), names_of)
                except (AttributeError, NotImplementedError, TypeError):
                    found = []
                if found:
                    return found
    return []


def find_head(model: nn.Module) -> list[str]:
    """Names of the modules of ``model``'s output head, in the order declared; ``[]`` if it has none to find.

    A head replaced by ``nn.Identity`` (a timm backbone built with ``num_classes=0``) is still named: it is where the
    head goes. The declarations of timm and transformers are read first, the names of :data:`HEAD_NAMES` after
    (see the module docstring).

    Args:
        model: Any module: a timm or transformers model, one adapted by HF peft, a LightningModule holding one.

    Returns:
        Dotted module names (``named_modules()`` of ``model``).

    Example::

        >>> import timm
        >>> find_head(timm.create_model("deit_tiny_distilled_patch16_224", depth=1, num_classes=3))
        ['head', 'head_dist']
        >>> from torch import nn
        >>> find_head(nn.Sequential())
        []
    """
    names_of: dict[int, str] = {}
    for name, module in model.named_modules():
        names_of.setdefault(id(module), name)
    declared = _declared(model, names_of)
    if declared:
        return declared
    matches = [name for name in names_of.values() if name and name.rsplit(".", 1)[-1] in HEAD_NAMES]
    return [name for name in matches if not any(name.startswith(f"{other}.") for other in matches)]
