"""Argument checks shared by every public constructor: one wording, and booleans are never numbers.

Each check raises a ``ValueError`` that names the argument in backticks, says what is allowed and what was got, and
ends with a ``HINT``; it returns the value (a number as ``float`` for number checks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _fail(name: str, allowed: str, value: Any, hint: str) -> ValueError:
    return ValueError(f"`{name}` must be {allowed}, got {value!r}. HINT: {hint}")


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
) -> float:
    """A real number (never a bool) between ``low`` and ``high`` (bounds included as asked); ``allowed`` says so.

    Example::

        >>> check_number("ratio", 0.5, 0, 1, "e.g. 0.5.", "a number strictly between 0 and 1")
        0.5
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
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
