"""Validation of method hyperparameters at construction time (before any model is read).

Every check raises :class:`~fusion_bench.errors.ConfigError` quoting the method, the option
(``!r``), the valid range or choices, and the value given.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from fusion_bench.errors import ConfigError

__all__ = ["check_range", "check_int", "check_choice", "check_bool", "check_number_list"]


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_range(method: str, option: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
                low_open: bool = False, high_open: bool = False, hint: str = "") -> float:  # fmt: skip
    """``value`` as a float if it lies in the interval, else a ConfigError.

    Args:
        method: the method's name (start of the message).
        option: the option's name.
        value: the value given.
        low, high: the interval's ends; ``low_open``/``high_open`` exclude them.
        hint: appended to the message (what the option means).

    Returns:
        ``float(value)``.
    """
    number = _number(method, option, value)
    inside = (number > low if low_open else number >= low) and (number < high if high_open else number <= high)
    if not inside:
        where = f"in {_interval(low, high, low_open, high_open)}" if math.isfinite(low) or math.isfinite(high) else "finite"
        raise ConfigError(f"{method}: option {option!r} must be {where}{hint}; got {value!r}")
    return number


def _number(method: str, option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{method}: option {option!r} must be a number; got {value!r}")
    return float(value)


def check_int(method: str, option: str, value: Any, *, low: int = 0) -> int:
    """``value`` as an int ``≥ low``, else a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{method}: option {option!r} must be an integer >= {low}; got {value!r}")
    return int(value)


def check_choice(method: str, option: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ConfigError listing them."""
    if value not in choices:
        raise ConfigError(f"{method}: option {option!r} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return str(value)


def check_bool(method: str, option: str, value: Any) -> bool:
    """``value`` if it is a bool, else a ConfigError."""
    if not isinstance(value, bool):
        raise ConfigError(f"{method}: option {option!r} must be true or false; got {value!r}")
    return value


def check_number_list(method: str, option: str, value: Any) -> list[float]:
    """``value`` as a list of finite floats, else a ConfigError."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{method}: option {option!r} must be a list of numbers; got {value!r}")
    numbers = [check_range(method, f"{option}[{i}]", v) for i, v in enumerate(value)]
    return numbers
