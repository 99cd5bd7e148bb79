"""Name -> factory registries with helpful errors (lm-evaluation-harness style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from vlmkit.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A small mapping from names to factories; unknown names list what is available."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, doc: str | None = None):
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = fn
            first_line = ((fn.__doc__ or "").strip().splitlines() or [""])[0]
            self._docs[name] = doc if doc is not None else first_line
            return fn

        return deco

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._items:
            raise ConfigError(f"Unknown {self.kind} {name!r}. Available: {', '.join(sorted(self._items))}")
        return self._items[name]

    def build(self, name: str, *args, **kwargs) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self, name: str) -> str:
        return self._docs.get(name, "")

    def __contains__(self, name: str) -> bool:
        return name in self._items
