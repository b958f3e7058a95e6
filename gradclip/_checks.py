"""Argument checks shared by the public constructors: constant time, clear errors.

Numbers are Python's or NumPy's (``numbers.Real``; ints and ``numpy.int64`` alike); a
``bool`` is refused where a number is meant, since ``window=True`` is a slip, not a window
of 1. Each error names the argument, the value and what to pass instead.
"""

from __future__ import annotations

import math
import numbers


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def real(name: str, value, hint: str, *, finite: bool = True) -> float:
    """``value`` as a float: a real number, not a bool, not NaN (nor inf when ``finite``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}; "
                        f"{hint}")
    value = float(value)
    if finite:
        check(math.isfinite(value), f"{name} must be finite, got {value!r}; {hint}")
    else:
        check(not math.isnan(value), f"{name} must not be NaN; {hint}")
    return value


def integer(name: str, value, hint: str, *, minimum: int | None = None) -> int:
    """``value`` as an int: an integer (not a bool) or a finite float with an integer
    value, at least ``minimum`` when given."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
    else:
        as_float = real(name, value, hint)
        check(as_float.is_integer(), f"{name} must be an integer, got {value!r}; {hint}")
        number = int(as_float)
    check(minimum is None or number >= minimum,
          f"{name} must be an integer >= {minimum}, got {value!r}; {hint}")
    return number


def flag(name: str, value) -> bool:
    """``value`` as a bool: Python's ``True``/``False`` or NumPy's ``bool_``."""
    if not (isinstance(value, bool) or type(value).__name__ in ("bool", "bool_")):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def choice(name: str, value, choices: tuple[str, ...]) -> str:
    check(isinstance(value, str) and value in choices,
          f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
