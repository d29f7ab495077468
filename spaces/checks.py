"""Validation helpers every frozen config uses: one-line ``ValueError`` messages that name
the field, what it must be and what it got.

``name`` is how the field is shown (``"batch_size"``, ``"tpe option n_ei_candidates"``);
the layer that reads a file adds where it came from (``[evaluation]``). Each helper returns
the value normalised (a float for numbers, a tuple for lists) so ``__post_init__`` can
store it back with ``object.__setattr__``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

C = TypeVar("C")


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (not a bool) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an integer <= {maximum}, got {value!r}")
    return value


def check_number(name: str, value: Any, minimum: float | None = None, maximum: float | None = None, *,
                 positive: bool = False) -> float:
    """A finite number (not a bool) within ``[minimum, maximum]`` (``positive``: > 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_str(name: str, value: Any, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise ValueError(f"{name} must be a {'' if empty else 'non-empty '}string, got {value!r}")
    return value


def check_str_list(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be a list of strings, got {value!r}")
    return tuple(value)


def check_number_list(name: str, value: Any, minimum: float | None = None, maximum: float | None = None) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of numbers, got {value!r}")
    return tuple(check_number(f"{name} entry", v, minimum, maximum) for v in value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r} (known: {', '.join(choices)})")
    return value


def check_keys(name: str, data: Mapping[str, Any], known: Iterable[str]) -> None:
    """``ValueError`` for the first key of ``data`` not in ``known`` (``name``: the table)."""
    known = set(known)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"unknown key {unknown[0]!r} in {name} (known: {', '.join(sorted(known))}); remove or rename it"
        )


def from_mapping(cls: type[C], data: Mapping[str, Any], name: str = "") -> C:
    """Build the frozen dataclass ``cls`` from a mapping (a TOML table): unknown keys are
    errors; a missing required field or a wrong type is a one-line ``ValueError``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{name or cls.__name__} must be a table, got {type(data).__name__}")
    check_keys(name or cls.__name__, data, (f.name for f in dataclasses.fields(cls)))  # type: ignore[arg-type]
    try:
        return cls(**data)
    except TypeError as exc:  # a missing required field
        raise ValueError(f"{name or cls.__name__}: {exc}") from None
