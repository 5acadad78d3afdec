"""Test-session rules for the whole repository (tests/ and the doctests of lightning_peft/).

Tests that synthesise speech need the ``espeak-ng`` program (a Debian package, not a pip one). They carry the
``espeak`` marker: on a machine without the program they are skipped with a reason that says how to install it, so
``python -m pytest`` passes on a fresh checkout; where the ``CI`` environment variable is set (``.ci/run`` installs
espeak-ng) a missing program fails them instead, so CI can never skip them silently.
"""

from __future__ import annotations

import os
import shutil

import pytest

ESPEAK_PROGRAM = "espeak-ng"
# Doctests that call espeak-ng (doctest items cannot carry a marker in their source).
_ESPEAK_DOCTESTS = ("lightning_peft.data.spoken_keywords.synthesize",)
_INSTALL = "install it with `sudo apt-get install espeak-ng` (Debian/Ubuntu) or `brew install espeak-ng` (macOS)"


def running_in_ci() -> bool:
    """True when the ``CI`` environment variable is set to anything but an empty string, ``0`` or ``false``."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the doctests that call espeak-ng with ``espeak``."""
    for item in items:
        if type(item).__name__ == "DoctestItem" and item.name in _ESPEAK_DOCTESTS:  # by name: no private import
            item.add_marker(pytest.mark.espeak)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip (or, under CI, fail) an ``espeak`` test when the program is missing, before its fixtures run."""
    if item.get_closest_marker("espeak") is None or shutil.which(ESPEAK_PROGRAM) is not None:
        return
    if running_in_ci():
        pytest.fail(
            f"`{ESPEAK_PROGRAM}` is not on PATH, and CI (the `CI` environment variable is set) must run the tests"
            f" that synthesise speech. HINT: {_INSTALL}; `.ci/run` does so.",
            pytrace=False,
        )
    pytest.skip(f"needs the `{ESPEAK_PROGRAM}` program to synthesise speech; {_INSTALL}")
