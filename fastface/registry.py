"""A small name -> object registry that refuses duplicates and suggests close names.

An entry may be registered lazily as ``"package.module:attribute"``: its name is known at once
(a CLI can list it without importing heavy modules) and the object is imported on first use.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown registry name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def import_target(target: str):
    """The object a ``"package.module:attribute"`` string names, imported now."""
    module, _, attribute = target.partition(":")
    if not module or not attribute:
        raise ValueError(f"expected 'package.module:attribute', got {target!r}")
    return getattr(importlib.import_module(module), attribute)


class _Lazy:
    def __init__(self, target: str) -> None:
        self.target = target

    def load(self):
        return import_target(self.target)


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T | _Lazy] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``name`` now and import its object (``"package.module:attribute"``) on first use."""
        self.register(name, _Lazy(target))  # type: ignore[arg-type]

    def get(self, name: str) -> T:
        try:
            item = self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {', '.join(sorted(self._items))}"
            ) from None
        if isinstance(item, _Lazy):
            item = self._items[name] = item.load()
        return item

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def items(self):
        return [(name, self.get(name)) for name in self._items]
