"""Name -> object registries for what grows (pruning methods, allocations, oracles).

Adding one is one definition and one ``register`` line, wherever it lives; every caller looks it
up by name, so the CLI, the flows and a notebook pick it up without an if-chain to extend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Generic, TypeVar, overload

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects of one kind by name; ``kind`` names them in the error for an unknown name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._order: dict[str, float | None] = {}

    @overload
    def register(self, name: str, *, order: float | None = ...) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T, *, order: float | None = ...) -> T: ...

    def register(self, name, obj=None, *, order=None):
        """``REG.register("x", obj)``, or ``@REG.register("x")`` above a function or class.

        ``order`` places it in :meth:`names` and :meth:`ranked` (lowest first; entries without one
        follow in registration order), so where an entry is listed does not depend on which module
        happened to be imported first.
        Registering a name twice is a mistake (one would silently shadow the other), so it raises.
        """

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            self._order[name] = order
            return item

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items, key=lambda n: math.inf if self._order[n] is None else self._order[n])  # stable

    def ranked(self) -> list[str]:
        """The names registered with an order, in it (a registry's default selection: the search's baselines)."""
        return [n for n in self.names() if self._order[n] is not None]

    def __contains__(self, name: object) -> bool:
        return name in self._items
