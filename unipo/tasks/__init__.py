"""Tasks: prompts, verifiers and expert demonstrations (see `unipo.tasks.base`).

Importing this package registers the built-ins in `TASKS`: addition, multiplication, sort,
countdown, rg (reasoning-gym), jsonl and hf (`datasets`). Build one with `get_task("addition:digits=3")`.
"""

from __future__ import annotations

from unipo.tasks import addition, countdown, hf, jsonl, multiplication, rg, sort  # noqa: F401 (registration)
from unipo.tasks.base import (
    MAX_SCORED_CHARS,
    TASKS,
    GeneratedTask,
    Problem,
    ScoreResult,
    Task,
    extract_answer,
    get_task,
    score_completions,
    split_of,
)

__all__ = [
    "MAX_SCORED_CHARS",
    "TASKS",
    "GeneratedTask",
    "Problem",
    "ScoreResult",
    "Task",
    "extract_answer",
    "get_task",
    "score_completions",
    "split_of",
]
