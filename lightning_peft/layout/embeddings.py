"""The input embeddings of a model: the parameters outside the blocks that turn the input into the first hidden state.

:func:`find_embeddings` prefers what the ecosystem declares, as :func:`~lightning_peft.layout.find_head` does:

1. transformers: ``get_input_embeddings()`` (the token table); when it sits in a container of its own (BERT's
   ``embeddings`` with position and token-type tables and a norm), that whole container;
2. every ``nn.Embedding`` outside the blocks and the head (GPT-2's position table ``wpe``);
3. names: modules or parameters outside the blocks whose last name component contains ``embed`` (timm's
   ``patch_embed`` / ``pos_embed``, a plain module's ``embed``) or is a timm class / register / distillation token.

The head is never counted: a head tied to the token table shares its parameter, which is named once (under the
embeddings, as ``named_parameters()`` names it).
"""

from __future__ import annotations

from collections.abc import Collection

from torch import nn

__all__ = ["TOKEN_NAMES", "find_embeddings"]

# Learned tokens of timm vision transformers that are prepended to the patch embeddings.
TOKEN_NAMES = ("cls_token", "reg_token", "dist_token")


def _is_embedding_name(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return "embed" in last or last in TOKEN_NAMES


def find_embeddings(model: nn.Module, outside: Collection[str], head: Collection[str] = ()) -> list[str]:
    """Names of the input-embedding parameters of ``model``, in ``named_parameters()`` order.

    Args:
        model: Any module: a transformers or timm model, one adapted by HF peft, a LightningModule holding one.
        outside: names of the parameters outside every block (:meth:`LayerStack.outside_parameter_names
            <lightning_peft.layout.LayerStack.outside_parameter_names>`); only these can be embeddings.
        head: names of the head's modules (:func:`~lightning_peft.layout.find_head`); their parameters are not.

    Returns:
        Parameter names (``named_parameters()`` of ``model``); ``[]`` if none is found.

    Example::

        >>> from torch import nn
        >>> net = nn.ModuleDict({"embed": nn.Embedding(10, 4), "blocks": nn.ModuleList([nn.Linear(4, 4)]),
        ...                      "head": nn.Linear(4, 10)})
        >>> find_embeddings(net, ["embed.weight", "head.weight", "head.bias"], ["head"])
        ['embed.weight']
    """
    outside = set(outside)
    names_of: dict[int, str] = {}
    for name, module in model.named_modules():
        names_of.setdefault(id(module), name)
    head_prefixes = tuple(f"{h}." for h in head if h)
    modules: list[str] = []
    for _, module in model.named_modules():  # transformers' declaration, outermost model first
        getter = getattr(type(module), "get_input_embeddings", None)
        if not callable(getter):
            continue
        try:
            table = getter(module)
        except (AttributeError, NotImplementedError, TypeError):
            continue
        name = names_of.get(id(table)) if isinstance(table, nn.Module) else None
        if name:
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            modules.append(parent if parent and parent.rsplit(".", 1)[-1] in ("embeddings", "embed") else name)
            break
    for name, module in model.named_modules():
        if name and (isinstance(module, nn.Embedding) or _is_embedding_name(name)):
            modules.append(name)
    prefixes = tuple(f"{m}." for m in modules)
    found = []
    for name, _ in model.named_parameters():
        if name not in outside or name.startswith(head_prefixes):
            continue
        if name.startswith(prefixes) or _is_embedding_name(name):
            found.append(name)
    return found
