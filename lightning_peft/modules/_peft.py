"""The ``peft`` argument of the ready LightningModules: checked into a ``PeftConfig``, then applied to the network.

- :func:`build_peft_config` turns the ``peft`` argument (a dict from YAML, or a ``peft.PeftConfig``) into a checked
  ``PeftConfig`` (or this package's :class:`~lightning_peft.adapters.AdapterConfig`);
- :func:`apply_peft` wraps a network with it, keeping the classification head trainable.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from torch import nn

from lightning_peft.adapters import ADAPTER_PEFT_TYPES, AdapterConfig, add_adapters


def build_peft_config(peft: Mapping[str, Any] | PeftConfig | None, default_task_type: str | None = None):
    """Check the ``peft`` argument of a module and return it as a fresh ``PeftConfig`` (or None).

    Args:
        peft: An HF peft config as a dict (``{"peft_type": "LORA", "r": 8, ...}``), a ``PeftConfig``, or None. The
            adapters of this package are named the same way: ``{"peft_type": "BOTTLENECK", "layout": "houlsby"}``
            (or ``CONFORMER``) gives a :class:`~lightning_peft.adapters.AdapterConfig`.
        default_task_type: Task type to set when the config names none (e.g. ``"SEQ_CLS"``).

    Returns:
        A copy of the config (the caller's object is never changed), or None when ``peft`` is None.

    Raises:
        TypeError: If ``peft`` is neither a dict nor a ``PeftConfig``.
        ValueError: If the dict has no known ``peft_type`` or has keys that its config class rejects.
    """
    if peft is None:
        return None
    if isinstance(peft, (PeftConfig, AdapterConfig)):
        config = copy.deepcopy(peft)
    elif isinstance(peft, Mapping):
        fields = dict(peft)
        allowed = ", ".join([str(t.value) for t in PEFT_TYPE_TO_CONFIG_MAPPING] + list(ADAPTER_PEFT_TYPES))
        if "peft_type" not in fields:
            raise ValueError(
                f"`peft` must name its method in a `peft_type` key, got keys {sorted(fields)}."
                f" HINT: add e.g. `peft_type: LORA` (one of {allowed})."
            )
        fields["peft_type"] = str(fields["peft_type"]).upper()
        if fields["peft_type"] in ADAPTER_PEFT_TYPES:
            config_class = AdapterConfig
        elif fields["peft_type"] not in PEFT_TYPE_TO_CONFIG_MAPPING:
            raise ValueError(
                f"`peft.peft_type` must be one of {allowed}, got {peft['peft_type']!r}."
                " HINT: use `LORA` for LoRA adapters."
            )
        else:
            config_class = PEFT_TYPE_TO_CONFIG_MAPPING[fields["peft_type"]]
        try:
            config = config_class(**fields)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"`peft` is not a valid {config_class.__name__}: {err}."
                f" HINT: keep only the fields of `peft.{config_class.__name__}` in the dict."
            ) from err
    else:
        raise TypeError(
            f"`peft` must be a dict or a `peft.PeftConfig`, got {type(peft).__name__}."
            " HINT: pass e.g. {'peft_type': 'LORA', 'r': 8, 'target_modules': ['qkv']}."
        )
    if default_task_type is not None and getattr(config, "task_type", None) is None:
        config.task_type = default_task_type
    return config


def apply_peft(model: nn.Module, config: PeftConfig | AdapterConfig, head_names: Sequence[str] = ()) -> nn.Module:
    """Wrap ``model`` with ``config``, adding ``head_names`` to ``modules_to_save`` when the config sets none.

    An :class:`~lightning_peft.adapters.AdapterConfig` inserts this package's adapters in place instead
    (:func:`~lightning_peft.adapters.add_adapters`) and returns ``model`` itself.

    Args:
        model: The network to adapt.
        config: A config from :func:`build_peft_config`; it is changed in place.
        head_names: Module names of the classification head, kept fully trainable.

    Returns:
        The ``PeftModel`` (or the adapted model): only the adapter and ``modules_to_save`` parameters require
        gradients.

    Raises:
        ValueError: If peft cannot place the adapters (e.g. no ``target_modules`` for a non-HF model); the message
            lists the Linear layer names that could be targeted.
    """
    if head_names and hasattr(config, "modules_to_save") and not config.modules_to_save:
        config.modules_to_save = list(head_names)
    if isinstance(config, AdapterConfig):
        return add_adapters(model, config)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        linear_names = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(
            f"peft could not adapt {type(model).__name__}: {err}"
            f" HINT: set `target_modules` in `peft` to some of the model's Linear layers: {linear_names}."
        ) from err
