"""Misbehaving tools for tests/test_envs.py.

In their own small module (not the test file) so that the reward-sandbox worker that unpickles them imports only
this, not pytest.
"""

from __future__ import annotations

import time


def add(a: int, b: int) -> float:
    return a + b


def boom(x: int) -> float:
    raise RuntimeError(f"boom {x}")


def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return 0.0


def scribble(path: str) -> float:
    with open(path, "w") as fh:
        fh.write("written by a tool")
    return 1.0


def words(n: int) -> float:
    return "not a number"  # type: ignore[return-value]


def huge(n: int) -> float:  # an int beyond float's range
    return 10 ** (400 + n)  # type: ignore[return-value]


def describe(n: int) -> str:  # text with a newline and non-ASCII characters
    return f"line one: {n}\nzwei: \u00fc \u2713"


def flood(n: int) -> str:  # n two-byte characters
    return "\u00e9" * n


def mute(n: int) -> str:  # says text, returns a number
    return n  # type: ignore[return-value]


TOOLS = {f.__name__: f for f in (add, boom, sleepy, scribble, words, huge, describe, flood, mute)}
