"""Validation of method hyperparameters at construction time (before any model is read).

Every check raises :class:`~fusion_bench.errors.ConfigError` quoting the method, the option
(``!r``), the valid range or choices, and the value given.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from fusion_bench.errors import ConfigError

__all__ = [
    "check_range",
    "check_int",
    "check_choice",
    "check_bool",
    "check_number_list",
    "check_arguments",
    "check_finite_values",
]


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_range(
    method: str,
    option: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
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
    if not math.isfinite(number):
        raise ConfigError(f"{method}: option {option!r} must be a finite number; got {value!r}")
    inside = (number > low if low_open else number >= low) and (number < high if high_open else number <= high)
    if not inside:
        where = (
            f"in {_interval(low, high, low_open, high_open)}" if math.isfinite(low) or math.isfinite(high) else "finite"
        )
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


_NUMERIC = {"float", "int"}


def _numeric_annotation(annotation: Any) -> bool:
    """Whether an annotation (a string under ``from __future__ import annotations``) admits only
    numbers (and None): ``float``, ``int``, ``float | None``..."""
    if isinstance(annotation, type):
        return annotation in (int, float)
    if not isinstance(annotation, str):
        return False
    parts = {p.strip() for p in annotation.replace("Optional[", "").replace("]", "").split("|")}
    return bool(parts & _NUMERIC) and parts <= _NUMERIC | {"None"}


def check_finite_values(owner: str, option: str, value: Any) -> None:
    """Refuse NaN/Inf anywhere in ``value`` (a number, or lists/dicts of them), naming the option."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{owner}: option {option!r} must be a finite number; got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite_values(owner, f"{option}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_finite_values(owner, f"{option}[{i}]", item)


def check_arguments(owner: str, fn: Any, args: tuple, kwargs: dict[str, Any]) -> None:
    """Check a constructor's arguments against its signature before it runs.

    Every number must be finite (NaN/Inf never make a meaningful merge), and a parameter
    annotated as a number (``float``, ``int``, optionally ``| None``) must get one, not a string
    such as ``'abc'``. Raises a :class:`ConfigError` naming ``owner`` and the option.
    """
    import inspect

    try:
        bound = inspect.signature(fn).bind_partial(None, *args, **kwargs)
    except (TypeError, ValueError):
        return  # wrong names/arity: the call itself reports them
    params = inspect.signature(fn).parameters
    for name, value in list(bound.arguments.items())[1:]:
        check_finite_values(owner, name, value)
        param = params.get(name)
        numeric = param is not None and _numeric_annotation(param.annotation)
        if numeric and value is not None and (isinstance(value, (str, bool)) or not isinstance(value, (int, float))):
            raise ConfigError(f"{owner}: option {name!r} must be a number; got {value!r}")
