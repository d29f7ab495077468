"""Registry: the one way a pluggable thing (searcher, criterion, recovery, task, objective,
watermark rule) is registered by name and looked up.

A registry maps names to entries (a class, a function, or a small record). ``register``
is a decorator; a name registers once (registering the same entry again is a no-op, so a
module re-imported by Ray's workers does not fail). ``get`` raises a one-line
``ValueError`` naming the known entries. ``plugins`` are modules imported on the first
lookup: modules that register more entries but import the registry's own module, so they
cannot be imported by it at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry, filled by ``@registry.register(name)``."""

    def __init__(self, kind: str, *, plugins: Sequence[str] = (), unknown: str = "unknown {kind} {name!r}") -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._plugins = tuple(plugins)
        self._plugins_loaded = not self._plugins
        self._unknown = unknown

    def register(self, name: str, entry: T | None = None) -> Callable[[T], T]:
        """Decorator adding its target under ``name``; with ``entry``, adds it at once."""

        def wrap(target: T) -> T:
            self.add(name, target)
            return target

        if entry is not None:
            return wrap(entry)  # type: ignore[return-value]
        return wrap

    def add(self, name: str, entry: T) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        current = self._entries.get(name)
        if current is not None and current is not entry and _qualname(current) != _qualname(entry):
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry

    def remove(self, name: str) -> None:
        """Drop ``name`` if registered (tests that register throw-away entries)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry registered under ``name``; ``ValueError`` naming the known ones."""
        self._load_plugins()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            known = ", ".join(self.names()) or "none"
            raise ValueError(f"{self._unknown.format(kind=self.kind, name=name)} (known: {known})") from None

    def names(self) -> tuple[str, ...]:
        """Every registered name, sorted."""
        self._load_plugins()
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        self._load_plugins()
        return sorted(self._entries.items())

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for module in self._plugins:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:  # the module exists but one of its own imports is missing
                    raise


def _qualname(entry: object) -> str:
    # The same class or function defined again by a re-import is the same registration.
    return f"{getattr(entry, '__module__', '')}.{getattr(entry, '__qualname__', id(entry))}"
