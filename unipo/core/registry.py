"""Named registries: one per slot of the unified estimator.

Every variant of a slot (an advantage estimator, a policy loss, ...) is registered under a
name; callers look it up by that name and nothing else, so a recipe is a choice of names.
Registering a name twice is an error: two functions silently answering to one name is the
kind of bug that makes two papers' numbers incomparable.

A function that needs batch tensors beyond its registry's shared signature (the expert-row
flags, the token entropy, the reference log-probs, ...) declares them when it registers,
`@REGISTRY.register("luffy", inputs=("off_policy",))`. The trainer hands it exactly those, from
one provider table, and fails with an error naming the input when it cannot provide one:
nothing is wired by guessing from parameter names.
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
        self._inputs: dict[str, tuple[str, ...]] = {}

    def register(self, name: str, *, inputs: Collection[str] = ()) -> Callable[[F], F]:
        """Register under `name`; `inputs` are the keyword parameters the caller fills from the batch."""
        def decorator(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            if callable(fn):
                params = inspect.signature(fn).parameters
                undeclared = [k for k in inputs if k not in params]
                if undeclared:
                    raise ValueError(f"{self.kind} {name!r} declares inputs {undeclared} it does not accept")
            self._entries[name] = fn
            self._inputs[name] = tuple(inputs)
            return fn

        return decorator

    def inputs(self, name: str) -> tuple[str, ...]:
        """The batch inputs `name` declared when it registered."""
        self.get(name)
        return self._inputs[name]

    def get(self, name: str) -> F:  # type: ignore[override]
        """The function registered as `name`; ValueError listing the valid names otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries))
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {valid}") from None

    def check_params(self, name: str, params: Mapping[str, object], shared: Collection[str] = ()) -> None:
        """ValueError naming the accepted keyword params when `params` has an unknown one or
        lacks a required one (`shared` names the inputs every entry takes, not params; the entry's
        declared batch inputs are not params either)."""
        inputs = set(self.inputs(name))  # filled by the caller from the batch: allowed, never required
        keyword_only = [p for p in inspect.signature(self.get(name)).parameters.values()
                        if p.kind is p.KEYWORD_ONLY and p.name not in shared and p.name not in inputs]
        accepted = {p.name for p in keyword_only}
        required = {p.name for p in keyword_only if p.default is p.empty}
        unknown, missing = sorted(set(params) - accepted - inputs), sorted(required - set(params))
        if unknown or missing:
            raise ValueError(f"{self.kind} {name!r}: unknown params {unknown}, missing params {missing}; "
                             f"it accepts {sorted(accepted) or 'no params'}")

    def check_inputs(self, name: str, given: Collection[str]) -> None:
        """ValueError naming the declared batch inputs of `name` that it requires and `given` lacks."""
        params = inspect.signature(self.get(name)).parameters
        missing = [k for k in self.inputs(name) if k not in given and params[k].default is params[k].empty]
        if missing:
            raise ValueError(f"{self.kind} {name!r} needs the batch inputs {missing}")

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
