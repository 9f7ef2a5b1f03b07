"""Name -> object registries for what grows (pruning methods, allocations, oracles).

Adding one is one definition and one ``register`` line, wherever it lives; every caller looks it
up by name, so the CLI, the flows and a notebook pick it up without an if-chain to extend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar, overload

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects of one kind by name; ``kind`` names them in the error for an unknown name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name, obj=None):
        """``REG.register("x", obj)``, or ``@REG.register("x")`` above a function or class.

        Registering a name twice is a mistake (one would silently shadow the other), so it raises.
        """

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
