"""A tiny name -> factory registry, so variants are config values rather than branches or copied files."""
from __future__ import annotations

from typing import Callable, Dict, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} '{name}'; choose one of {sorted(self._entries)}")
        return self._entries[name]

    def names(self):
        return sorted(self._entries)

    def __iter__(self):  # `sorted(registry)` and `list(registry)` give the names, as for a dict
        return iter(self.names())

    def __contains__(self, name: str) -> bool:
        return name in self._entries
