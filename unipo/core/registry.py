"""Named registries: one per slot of the unified estimator.

Every variant of a slot (an advantage estimator, a policy loss, ...) is registered under a
name; callers look it up by that name and nothing else, so a recipe is a choice of names.
Registering a name twice is an error: two functions silently answering to one name is the
kind of bug that makes two papers' numbers incomparable.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Mapping[str, F], Generic[F]):
    """A read-only name -> function mapping filled by the `register` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def decorator(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> F:  # type: ignore[override]
        """The function registered as `name`; ValueError listing the valid names otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries))
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {valid}") from None

    def check_params(self, name: str, params: Mapping[str, object], shared: Collection[str] = ()) -> None:
        """ValueError naming the accepted keyword params when `params` has an unknown one or
        lacks a required one (`shared` names the inputs every entry takes, not params)."""
        keyword_only = [p for p in inspect.signature(self.get(name)).parameters.values()
                        if p.kind is p.KEYWORD_ONLY and p.name not in shared]
        accepted = {p.name for p in keyword_only}
        required = {p.name for p in keyword_only if p.default is p.empty}
        unknown, missing = sorted(set(params) - accepted), sorted(required - set(params))
        if unknown or missing:
            raise ValueError(f"{self.kind} {name!r}: unknown params {unknown}, missing params {missing}; "
                             f"it accepts {sorted(accepted) or 'no params'}")

    def __getitem__(self, name: str) -> F:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"
