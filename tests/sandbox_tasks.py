"""A deliberately hostile task for tests/test_sandbox.py: its scorer `eval`s the completion.

It lives in its own small module (not in the test file) so that a reward-sandbox worker, which
unpickles the task and so imports this module, does not import pytest and hypothesis too.
Registered in TASKS by tests/test_sandbox.py.
"""

from __future__ import annotations

from unipo.tasks.base import Problem, Task


class EvalTask(Task):
    """Reward 1 when `eval(completion)` equals `eval(answer)` (the answer is "[1]"): unsafe by design."""

    name = "hostile_eval"
    max_new_tokens = 16
    scorer_is_safe = False

    def sample(self, n: int, *, seed: int, split: str = "train") -> list[Problem]:
        return [Problem(prompt=f"say [1] ({seed}, {i})", answer="[1]", demonstration="[1]") for i in range(n)]

    def score(self, problem: Problem, completion: str) -> float:
        return float(eval(completion) == eval(problem.answer))  # noqa: S307 - the point of this task


class ProbeTask(Task):
    """Reports on the process that scores it: the completion names a check, the reward is 1 if it holds.

    Used to check the confinement of a sandbox scorer process from the inside.
    """

    name = "sandbox_probe"
    max_new_tokens = 16
    scorer_is_safe = False

    def sample(self, n: int, *, seed: int, split: str = "train") -> list[Problem]:
        return [Problem(prompt=f"probe {i}", answer="pid", demonstration="pid") for i in range(n)]

    def score(self, problem: Problem, completion: str) -> float:
        import os
        import resource

        def limit(which: int) -> int:
            return resource.getrlimit(which)[0]

        checks = {
            # 0, 1, 2, the pipe to the parent, and the descriptor listdir itself holds while reading
            "fds": lambda: len(os.listdir("/proc/self/fd")) <= 5,
            "stdio": lambda: all(os.readlink(f"/proc/self/fd/{fd}") == os.devnull for fd in (0, 1, 2)),
            "cwd": lambda: os.path.basename(os.getcwd()).startswith("unipo-sandbox-"),
            "session": lambda: os.getsid(0) == os.getpgid(0) == os.getppid(),  # the worker leads a new session
            "nofile": lambda: limit(resource.RLIMIT_NOFILE) == 64,
            "nproc": lambda: limit(resource.RLIMIT_NPROC) == 0,
            "fsize": lambda: limit(resource.RLIMIT_FSIZE) == 1 << 20,
            "core": lambda: limit(resource.RLIMIT_CORE) == 0,
            "as": lambda: limit(resource.RLIMIT_AS) != resource.RLIM_INFINITY,
            "cpu": lambda: limit(resource.RLIMIT_CPU) != resource.RLIM_INFINITY,
            "pid": lambda: os.getpid() == int(problem.meta.get("pid", -1)),
        }
        return float(checks[completion]())
