"""Turn what goes wrong in a CLI run into a message a person can act on.

jsonargparse reports a constructor's ``ValueError`` inside a union-type report or an ~80-line traceback, names no
file for a YAML syntax error, offers no suggestion for a misspelled class or option, and lets a bare ``no`` reach a
string list as a boolean. The functions here find our own message (the one with a ``HINT:``), name the file and
line, and suggest close names; :func:`lightning_peft.cli.cli_main` prints them without the traceback unless
``--debug`` or ``LIGHTNING_PEFT_DEBUG=1`` asks for it.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from typing import Any

__all__ = [
    "DEBUG_ENV",
    "TRACEBACK_HINT",
    "UserError",
    "check_config_file",
    "debug_requested",
    "explain_parse_error",
    "known_class_names",
    "our_message",
    "suggest",
]

DEBUG_ENV = "LIGHTNING_PEFT_DEBUG"
TRACEBACK_HINT = f"(run with --debug or {DEBUG_ENV}=1 for the full traceback)"
# YAML 1.1 words that a YAML parser turns into booleans when they are not quoted.
_YAML_BOOLEAN_WORDS = "yes / no / on / off / true / false / y / n"


class UserError(Exception):
    r"""A problem in the user's command or files, reported as its message alone (no traceback).

    Example::

        >>> from lightning_peft.cli.errors import UserError, check_config_file
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "bad.yaml")
        >>> _ = open(path, "w").write("trainer: [1\n")
        >>> try:
        ...     check_config_file(path)
        ... except UserError as err:
        ...     print(str(err).split(": YAML")[0].endswith("bad.yaml, line 2, column 1"))
        True
    """


def debug_requested(argv: list[str]) -> bool:
    """True when ``--debug`` is among the arguments or ``LIGHTNING_PEFT_DEBUG`` is set to a true value."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def our_message(error: BaseException) -> str | None:
    r"""Return the message of ours (with a ``HINT:``) inside ``error``, its causes, or a jsonargparse report.

    Example::

        >>> from lightning_peft.cli.errors import our_message
        >>> report = ValueError("Does not validate\n  - `n_layers` must be >= 1, got 0. HINT: use 2.\n  - Expected")
        >>> our_message(report)
        '`n_layers` must be >= 1, got 0. HINT: use 2.'
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if "HINT:" in text:
            lines = [line.strip().lstrip("-").strip() for line in text.splitlines() if "HINT:" in line]
            return lines[0] if "\n" in text else text
        current = current.__cause__ or current.__context__
    return None


def _class_names(base: type) -> set[str]:
    names, stack = set(), [base]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if not sub.__name__.startswith("_"):
                names.add(sub.__name__)
            stack.append(sub)
    return names


def known_class_names() -> list[str]:
    """Short names a config can use as ``class_path``: callbacks, modules, data modules, precision plugins, loggers."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.plugins.precision import Precision

    names: set[str] = set()
    for base in (pl.Callback, pl.LightningModule, pl.LightningDataModule, Precision, Logger):
        names |= _class_names(base)
    return sorted(names)


def suggest(name: str, candidates: Iterable[str]) -> str:
    """``"did you mean 'x' or 'y'?"`` for the names among ``candidates`` close to ``name``, else ``""``.

    Example::

        >>> suggest("exprot", ["fit", "export", "estimate"])
        "did you mean 'export'?"
    """
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in candidates}
        close = [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)]
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def explain_parse_error(text: str, option_names: Iterable[str] = ()) -> str | None:
    """Return a readable message for a jsonargparse error report, or None when there is nothing to add.

    Handles our constructors' messages inside union reports, unknown class names (with suggestions among
    :func:`known_class_names`) and unknown options (with suggestions among ``option_names``).

    Example::

        >>> from lightning_peft.cli.errors import explain_parse_error
        >>> print(explain_parse_error("error: ... - Expected a dot import path string: LIZA ..."))  # doctest: +ELLIPSIS
        `class_path` 'LIZA' is not a class this CLI knows; did you mean 'LISA'? HINT: use a short name such as ...
    """
    hint = next((line.strip().lstrip("-").strip() for line in text.splitlines() if "HINT:" in line), None)
    if hint is not None:
        return hint
    match = re.search(r'Parser key "([^"]+)":\s*Expected a <class \'str\'>\. Got value: (True|False)\b', text)
    if match:
        key, value = match.groups()
        return (
            f"`{key}` must be a string, got the boolean {value}: YAML reads the bare words {_YAML_BOOLEAN_WORDS} as"
            f" true / false. HINT: quote the value, e.g. {key}: 'no' (in a list: ['yes', 'no'])."
        )
    match = re.search(r"Problem with given class_path '([^']+)':\s*Option '([^']+)' is not accepted", text)
    if match:
        return _unknown_argument(match.group(1), match.group(2))
    match = re.search(r"Expected a dot import path string: (\S+)", text) or re.search(
        r"Problem with given class_path '([^']+)':\s*\n?\s*(?:No module|Import of|not found|.*not a valid)", text
    )
    if match:
        name = match.group(1)
        suggestion = suggest(name.rsplit(".", 1)[-1], known_class_names())
        return (
            f"`class_path` {name!r} is not a class this CLI knows; {suggestion or 'no close name.'}"
            " HINT: use a short name such as LISA, ImageClassifier, ImageFolder, or a full import path such as"
            " my_package.MyCallback."
        )
    match = re.search(r"does not accept option '([^']+)'|Unrecognized arguments: (\S+)", text, re.IGNORECASE)
    if match:
        option = (match.group(1) or match.group(2)).lstrip("-").split("=", 1)[0]
        suggestion = suggest(option, option_names)
        return (
            f"Unknown option `{option}`{'; ' + suggestion if suggestion else ''}"
            " HINT: `lightning-peft fit --help` lists the options; a class's own arguments are listed by"
            " `lightning-peft fit --model.help ImageClassifier` (or --data.help / --trainer.callbacks.help)."
        )
    return _wrong_type(text)


def _type_name(text: str) -> str:
    """``<class 'int'>`` -> ``int``, ``<class 'NoneType'>`` -> ``None``; other spellings as given."""
    name = re.sub(r"<class '([^']+)'>", r"\1", text.strip())
    return "None" if name == "NoneType" else name.removeprefix("builtins.")


def _wrong_type(text: str) -> str | None:
    """One message for jsonargparse's type report: the key (nested class arguments included), type and value."""
    keys = list(re.finditer(r'Parser key "([^"]+)":', text))
    if not keys:
        return None
    inner = keys[-1]
    block = text[inner.end() :]
    subtypes = re.match(r"\s*Does not validate against any of the Union subtypes\s*Subtypes: \[(.*)\]", block)
    expected = re.match(r"\s*Expected a (<class '[^']+'>|[^.\n]+)\.? Got value: (.*)", block)
    if subtypes:
        types = [_type_name(t) for t in re.findall(r"<class '[^']+'>|[^,\s][^,]*", subtypes.group(1))]
        value = re.search(r"Given value: (.*)", block)
        wanted, got = " or ".join(types), value.group(1).strip() if value else None
    elif expected:
        wanted, got = _type_name(expected.group(1)), expected.group(2).strip()
    else:
        return None
    key = inner.group(1)
    owner = ""
    if len(keys) > 1:
        problem = re.findall(r"Problem with given class_path '([^']+)'", text[keys[0].end() : inner.start()])
        if problem:
            owner = f" of {problem[-1].rsplit('.', 1)[-1]}"
            key = f"{keys[0].group(1)}.init_args.{key}" if keys[0].group(1) in ("model", "data") else key
    shown = f"got {got!r}" if got is not None else "got a value of another type"
    return (
        f"`{key}`{owner} must be {wanted}, {shown}."
        " HINT: give a value of that type (`lightning-peft fit --help` lists each option's type; quote a string"
        " that looks like a number)."
    )


def _unknown_argument(class_path: str, argument: str) -> str:
    import importlib
    import inspect

    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        parameters = [
            name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "args", "kwargs")
        ]
    except (ImportError, AttributeError, ValueError, TypeError):
        parameters = []
    suggestion = suggest(argument, parameters)
    return (
        f"`{argument}` is not an argument of {class_name}{'; ' + suggestion if suggestion else ''}"
        f" HINT: its arguments are {parameters}; `lightning-peft fit {_help_option(class_path)} {class_name}`"
        " describes them."
    )


def _help_option(class_path: str) -> str:
    """The ``--...help`` option that documents a class: ``--model.help``, ``--data.help`` or a callback's."""
    import importlib

    import lightning.pytorch as pl

    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        return "--help"
    for base, option in (
        (pl.Callback, "--trainer.callbacks.help"),
        (pl.LightningModule, "--model.help"),
        (pl.LightningDataModule, "--data.help"),
    ):
        if isinstance(cls, type) and issubclass(cls, base):
            return option
    return "--help"


def _yaml_booleans(node: Any, path: str) -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _yaml_booleans(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        if any(isinstance(item, str) for item in node) and any(isinstance(item, bool) for item in node):
            yield path
        for index, item in enumerate(node):
            yield from _yaml_booleans(item, f"{path}[{index}]")


def check_config_file(path: str) -> None:
    """Check a YAML config before jsonargparse reads it: syntax (file, line, column) and booleans among strings.

    Raises:
        UserError: If the file is not valid YAML, or a list of names holds a bare boolean word.
    """
    import yaml

    if not os.path.isfile(path):
        return  # `--config` also takes YAML text, and jsonargparse names a missing file itself
    with open(path, encoding="utf-8") as file:
        text = file.read()
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        raise UserError(
            f"{path}{where}: YAML syntax error: {problem}{f' ({context})' if context else ''}."
            " HINT: check the brackets, quotes and indentation at that line (lists are [a, b] or one '- item' per"
            " line; a value with ': ' or '#' needs quotes)."
        ) from err
    for key in _yaml_booleans(content, ""):
        raise UserError(
            f"{path}: `{key}` mixes names and booleans: YAML reads the bare words {_YAML_BOOLEAN_WORDS} as true /"
            f" false, so a name like `no` became a boolean. HINT: quote it, e.g. ['qkv', 'no']."
        )
