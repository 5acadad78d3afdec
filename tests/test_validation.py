"""The shared argument checks: what each accepts, what it refuses, and the one wording of the refusal."""

import functools
import math

import pytest

from lightning_peft._validation import (
    check_bool,
    check_callable,
    check_choice,
    check_distinct,
    check_int,
    check_number,
    check_seed,
    check_string,
)

ACCEPTED = [
    (functools.partial(check_int, minimum=0, hint="h"), 0, 0),
    (functools.partial(check_int, minimum=1, hint="h", allow_none=True), None, None),
    (functools.partial(check_number, low=0, high=math.inf, hint="h", allowed="a"), 3, 3.0),
    (functools.partial(check_number, low=0, high=1, hint="h", allowed="a", allow_none=True), None, None),
    (functools.partial(check_number, low=0, high=1, hint="h", allowed="a", include_low=True), 0, 0.0),
    (check_bool, False, False),
    (functools.partial(check_choice, choices=("a", "b"), hint="h"), "b", "b"),
    (check_seed, None, None),
    (functools.partial(check_string, hint="h"), "text", "text"),
    (functools.partial(check_distinct, minimum=2, hint="h"), ("a", "b"), ["a", "b"]),
    (functools.partial(check_distinct, minimum=1, hint="h"), [[1], [2]], [[1], [2]]),  # unhashable entries
    (functools.partial(check_callable, what="a callable", hint="h", allow_none=True), None, None),
    (functools.partial(check_callable, what="a callable", hint="h"), len, len),
]

REFUSED = [
    (functools.partial(check_int, minimum=1, hint="h"), 1.0, ValueError, r"`x` must be an integer >= 1, got 1.0\."),
    (functools.partial(check_int, minimum=0, hint="h"), False, ValueError, r"an integer >= 0, got False"),
    (functools.partial(check_number, low=0, high=1, hint="h", allowed="a fraction"), 1, ValueError, r"a fraction"),
    (functools.partial(check_number, low=0, high=1, hint="h", allowed="a fraction"), 0, ValueError, r"got 0\."),
    (functools.partial(check_number, low=-1, high=1, hint="h", allowed="in (-1, 1)"), math.nan, ValueError, r"nan"),
    (functools.partial(check_number, low=0, high=1, hint="h", allowed="a"), True, ValueError, r"got True"),
    (check_bool, 1, ValueError, r"`x` must be True or False, got 1\."),
    (functools.partial(check_choice, choices=["a"], hint="h"), "c", ValueError, r"one of \['a'\], got 'c'"),
    (functools.partial(check_string, hint="h"), "", ValueError, r"a non-empty string, got ''"),
    (functools.partial(check_string, hint="h", what="a column name"), None, ValueError, r"a column name, got None"),
    (functools.partial(check_distinct, minimum=1, hint="h"), "ab", ValueError, r"a non-empty list without dup"),
    (functools.partial(check_distinct, minimum=2, hint="h"), [1], ValueError, r"at least 2 different entries"),
    (functools.partial(check_distinct, minimum=1, hint="h"), [[1], [1]], ValueError, r"without duplicates"),
    (functools.partial(check_callable, what="a callable", hint="h"), None, TypeError, r"a callable, got None"),
    (functools.partial(check_callable, what="a callable", hint="h", allow_none=True), 1, TypeError, r"None or a c"),
]


@pytest.mark.parametrize(("check", "value", "expected"), ACCEPTED)
def test_accepted_values_are_returned(check, value, expected):
    assert check("x", value) == expected


@pytest.mark.parametrize(("check", "value", "error", "match"), REFUSED)
def test_refusals_name_the_argument_what_is_allowed_what_was_got_and_a_hint(check, value, error, match):
    with pytest.raises(error, match=match) as info:
        check("x", value)
    message = str(info.value)
    assert message.startswith("`x` must be ") and ", got " in message
    assert "HINT: " in message
