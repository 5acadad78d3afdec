"""How the ``trainer.callbacks`` of several ``--config`` files combine: added, never merged into each other.

jsonargparse replaces a list with the list of a later config, and when both have the same length it merges their
items by position: a user's ``ModelCheckpoint(every_n_train_steps: 12)`` written second in a two-item list
inherits ``monitor: val/acc`` from the shipped best-checkpoint callback, and a one-item list drops the shipped
checkpoint callbacks without a word. The rule here, applied before jsonargparse reads the arguments:

- a callback of a later config is **added** after the earlier ones (a ``ModelCheckpoint`` always is: a run may
  have several);
- a callback whose class is already there (other than ``ModelCheckpoint``) **replaces** that one, in place, so a
  second config can change the shipped ``LISA``'s arguments;
- a callback identical to one already there is left out (a config that repeats the shipped list adds nothing);
- the shipped callbacks go only when the user says so: ``--trainer.callbacks=[]`` on the command line empties the
  list, and the configs after it start from nothing.

Each combination is announced in one line naming the file, what it added or replaced and the resulting list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["combine_config_callbacks"]

_OPTION = "--trainer.callbacks"
# Classes a run may hold several of: always added, never replaced by class.
_SEVERAL_ALLOWED = ("ModelCheckpoint",)


def _class_name(item: Any) -> str:
    path = item.get("class_path", "") if isinstance(item, dict) else str(item)
    return str(path).rsplit(".", 1)[-1]


def _load_yaml(text_or_path: str) -> Any:
    import yaml

    try:
        if os.path.isfile(text_or_path):
            with open(text_or_path, encoding="utf-8") as file:
                return yaml.safe_load(file)
        return yaml.safe_load(text_or_path)
    except (OSError, yaml.YAMLError):
        return None


def _config_callbacks(path: str) -> list | None:
    """The ``trainer.callbacks`` list of a config file, or None when it sets none (or is not a file we can read)."""
    if not os.path.isfile(path):
        return None
    content = _load_yaml(path)
    trainer = content.get("trainer") if isinstance(content, dict) else None
    callbacks = trainer.get("callbacks") if isinstance(trainer, dict) else None
    if callbacks is None:
        return None
    return callbacks if isinstance(callbacks, list) else [callbacks]


def _combine(earlier: list, later: list) -> tuple[list, list[str]]:
    result, done = list(earlier), []
    for item in later:
        name = _class_name(item)
        if item in result:
            continue
        same_class = [i for i, old in enumerate(result) if _class_name(old) == name]
        if same_class and name not in _SEVERAL_ALLOWED:
            result[same_class[0]] = item
            done.append(f"replaces {name}")
        else:
            result.append(item)
            done.append(f"adds {name}")
    return result, done


def combine_config_callbacks(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Rewrite ``argv`` so later configs' callbacks are added to (or replace by class) the earlier ones.

    After each ``--config FILE`` whose ``trainer.callbacks`` meet callbacks of earlier arguments, the combined list
    is set explicitly (``--trainer.callbacks=[]`` then the list), so jsonargparse neither merges by position nor
    drops the earlier ones. ``--trainer.callbacks=VALUE`` on the command line replaces the list, as the user asked.

    Returns:
        The arguments to parse, and one notice per combination (empty when nothing combined).

    Example::

        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> for name, text in [("a.yaml", "trainer: {callbacks: [{class_path: ModelCheckpoint}, LISA]}"),
        ...                    ("b.yaml", "trainer: {callbacks: [{class_path: ModelCheckpoint, init_args: {every_n_train_steps: 12}}]}")]:
        ...     _ = open(os.path.join(folder, name), "w").write(text)
        >>> args, notices = combine_config_callbacks(["fit", "--config", f"{folder}/a.yaml", "--config", f"{folder}/b.yaml"])
        >>> args[-1]
        '--trainer.callbacks=[{"class_path": "ModelCheckpoint"}, "LISA", {"class_path": "ModelCheckpoint", "init_args": {"every_n_train_steps": 12}}]'
        >>> notices[0].split(": ", 1)[1]
        'adds ModelCheckpoint; the run has ModelCheckpoint, LISA, ModelCheckpoint (a later config adds callbacks; `--trainer.callbacks=[]` before it drops the earlier ones).'
    """  # noqa: E501
    args, notices = list(argv), []
    current: list | None = []  # None: set in a form not read here (left to jsonargparse)
    index = 0
    while index < len(args):
        arg = args[index]
        value, width = None, 1
        if arg in ("--config", "-c") and index + 1 < len(args):
            value, width = args[index + 1], 2
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value is not None:
            later = _config_callbacks(value)
            if later is not None and current:
                combined, done = _combine(current, later)
                names = ", ".join(_class_name(item) for item in combined)
                notices.append(
                    f"Callbacks of {value}: {'; '.join(done) or 'nothing new'}; the run has {names} (a later config"
                    " adds callbacks; `--trainer.callbacks=[]` before it drops the earlier ones)."
                )
                insert = [f"{_OPTION}=[]", f"{_OPTION}={json.dumps(combined)}"]
                args[index + width : index + width] = insert
                width += len(insert)
                current = combined
            elif later is not None:
                current = list(later)
        elif arg == _OPTION or arg.startswith(f"{_OPTION}="):
            text = arg.split("=", 1)[1] if "=" in arg else (args[index + 1] if index + 1 < len(args) else "")
            width = 1 if "=" in arg else 2
            loaded = _load_yaml(text)
            current = loaded if isinstance(loaded, list) else None
        elif arg.startswith(f"{_OPTION}+="):
            loaded = _load_yaml(arg.split("=", 1)[1])
            if current is not None:
                current = current + (loaded if isinstance(loaded, list) else [loaded if loaded is not None else arg])
        index += width
    return args, notices
