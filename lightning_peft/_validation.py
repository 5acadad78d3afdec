"""Argument checks shared by every public constructor: one wording, and booleans are never numbers.

Each check raises a ``ValueError`` that names the argument in backticks, says what is allowed and what was got, and
ends with a ``HINT``; it returns the value (a number as ``float`` for number checks).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any


def _fail(name: str, allowed: str, value: Any, hint: str, error: type[Exception] = ValueError) -> Exception:
    return error(f"`{name}` must be {allowed}, got {value!r}. HINT: {hint}")


def check_int(name: str, value: Any, minimum: int, hint: str, what: str = "", allow_none: bool = False) -> Any:
    """An integer (never a bool) of at least ``minimum``, or ``None`` when ``allow_none``.

    Example::

        >>> check_int("n_layers", 2, 1, "the paper uses 2.")
        2
        >>> check_int("n_layers", True, 1, "the paper uses 2.")
        Traceback (most recent call last):
        ...
        ValueError: `n_layers` must be an integer >= 1, got True. HINT: the paper uses 2.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"{'None or ' if allow_none else ''}an integer >= {minimum}{f' ({what})' if what else ''}"
        raise _fail(name, allowed, value, hint)
    return value


def check_number(
    name: str,
    value: Any,
    low: float,
    high: float,
    hint: str,
    allowed: str,
    include_low: bool = False,
    include_high: bool = False,
    allow_none: bool = False,
) -> float | None:
    """A real number (never a bool) between ``low`` and ``high`` (bounds included as asked); ``allowed`` says so.

    ``high=math.inf`` leaves the number unbounded above; ``allow_none`` also accepts ``None`` (returned as is).

    Example::

        >>> check_number("ratio", 0.5, 0, 1, "e.g. 0.5.", "a number strictly between 0 and 1")
        0.5
        >>> check_number("std", 0, 0, float("inf"), "e.g. std=0.5.", "a number > 0")
        Traceback (most recent call last):
        ...
        ValueError: `std` must be a number > 0, got 0. HINT: e.g. std=0.5.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(name, allowed, value, hint)
    number = float(value)
    above = number >= low if include_low else number > low
    below = number <= high if include_high else number < high
    if not (above and below):
        raise _fail(name, allowed, value, hint)
    return number


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` (not 0 / 1, not a string such as ``"no"``).

    Example::

        >>> check_bool("plot", "no")
        Traceback (most recent call last):
        ...
        ValueError: `plot` must be True or False, got 'no'. HINT: in YAML write true / false (bare yes / no too).
    """
    if not isinstance(value, bool):
        raise _fail(name, "True or False", value, "in YAML write true / false (bare yes / no too).")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any], hint: str) -> Any:
    """One of ``choices``.

    Example::

        >>> check_choice("format", "int4", ["int8", "fp8_e4m3"], "int8 is the default.")
        Traceback (most recent call last):
        ...
        ValueError: `format` must be one of ['int8', 'fp8_e4m3'], got 'int4'. HINT: int8 is the default.
    """
    if value not in choices:
        raise _fail(name, f"one of {list(choices)}", value, hint)
    return value


def check_seed(name: str, value: Any) -> Any:
    """``None`` or an integer (not a bool).

    Example::

        >>> check_seed("seed", 0)
        0
    """
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise _fail(name, "None or an integer", value, "e.g. seed=0.")
    return value


def check_string(name: str, value: Any, hint: str, what: str = "a non-empty string") -> str:
    """A non-empty string; ``what`` says what it names (e.g. ``"a column name (a non-empty string)"``).

    Example::

        >>> check_string("text_column", 3, "quote it in YAML, e.g. text_column: 'text'.")
        Traceback (most recent call last):
        ...
        ValueError: `text_column` must be a non-empty string, got 3. HINT: quote it in YAML, e.g. text_column: 'text'.
    """
    if not isinstance(value, str) or not value:
        raise _fail(name, what, value, hint)
    return value


def check_distinct(name: str, values: Any, minimum: int, hint: str) -> list[Any]:
    """A list (not a string) of at least ``minimum`` entries, none repeated; returned as a new list.

    Example::

        >>> check_distinct("words", ["yes", "no"], 2, "e.g. ['yes', 'no'].")
        ['yes', 'no']
        >>> check_distinct("words", ["yes", "yes"], 2, "once each.")
        Traceback (most recent call last):
        ...
        ValueError: `words` must be a list of at least 2 different entries, got ['yes', 'yes']. HINT: once each.
    """
    allowed = (
        f"a list of at least {minimum} different entries" if minimum > 1 else "a non-empty list without duplicates"
    )
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise _fail(name, allowed, values, hint)
    entries = list(values)
    try:
        distinct = len(set(entries)) == len(entries)
    except TypeError:  # unhashable entries
        distinct = all(a != b for i, a in enumerate(entries) for b in entries[i + 1 :])
    if len(entries) < minimum or not distinct:
        raise _fail(name, allowed, values, hint)
    return entries


def check_callable(name: str, value: Any, what: str, hint: str, allow_none: bool = False) -> Any:
    """A callable (a class, a function, a ``functools.partial``), or ``None`` when ``allow_none``; a ``TypeError``.

    Example::

        >>> check_callable("optimizer", "adam", "a callable that builds an optimizer", "pass torch.optim.AdamW.")
        Traceback (most recent call last):
        ...
        TypeError: `optimizer` must be a callable that builds an optimizer, got 'adam'. HINT: pass torch.optim.AdamW.
    """
    if value is None and allow_none:
        return None
    if not callable(value):
        raise _fail(name, f"{'None or ' if allow_none else ''}{what}", value, hint, error=TypeError)
    return value
