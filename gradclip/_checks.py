"""Argument checks shared by the public constructors: constant time, clear errors.

Numbers are accepted as Python and NumPy ints and floats (anything ``operator.index`` or
``float`` takes); ``bool`` is refused where a count or a threshold is meant, since
``window=True`` is a typo, not a window of 1.
"""

from __future__ import annotations

import math
import operator


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def integer(value, name: str, *, minimum: int, example: str) -> int:
    """``value`` as an int >= ``minimum``: ints and NumPy integers, and floats that are
    whole numbers (``warmup_steps=25.0``); not bools, NaN, inf or fractions."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}; for example {example}")
    try:
        number = operator.index(value)
    except TypeError:
        try:
            real = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be an integer, got {value!r}; "
                            f"for example {example}") from None
        if not real.is_integer():
            raise ValueError(f"{name} must be a whole number, got {value!r}; "
                             f"for example {example}") from None
        number = int(real)
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}; for example {example}")
    return number


def real(value, name: str, *, example: str, finite: bool = True) -> float:
    """``value`` as a float (ints, floats, NumPy scalars, 0-d tensors); NaN is refused,
    and so is inf when ``finite``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}; for example {example}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}; for example {example}") from None
    if math.isnan(number) or (finite and math.isinf(number)):
        kind = "finite number" if finite else "number (not NaN)"
        raise ValueError(f"{name} must be a {kind}, got {value!r}; for example {example}")
    return number


def choice(value, name: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value
