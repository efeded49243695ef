"""A name -> object registry, one per family (models, heads, regularizers, ...)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sparse_embed.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to builders of one family.

    Args:
        kind: What the registry holds, used in error messages ("model", "head").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Returns a decorator that registers its argument under `name`.

        Args:
            name: The name configs use to select the entry.

        Raises:
            ValueError: If `name` is already registered.
        """

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """Returns the entry registered under `name`.

        Args:
            name: A registered name.

        Raises:
            ConfigError: If `name` is unknown; the message lists the valid names.
        """
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(self.names())}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        """Returns the registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: Any) -> bool:
        return name in self._entries
