"""The reward sandbox: completions are scored by scorers that are not known safe in worker processes.

Model output is untrusted input, and some verifiers run it as code: reasoning-gym's spiral_matrix,
binary_matrix, n_queens and string_insertion evaluate the answer as a Python expression; its countdown, puzzle24,
polynomial_multiplication and integration tasks call sympy's `parse_expr`, which evaluates too
(`9**9**9` hangs it); math-verify parses with sympy. A task whose `scorer_is_safe` is False (every
task but the built-in pure verifiers) is therefore scored here, never in the training process.

Processes. A pool of `workers` processes is started once through multiprocessing's "forkserver"
context (the server preloads unipo's tasks, reasoning-gym and math-verify, so replacing a killed
worker and building its task again took ~50 ms on a 2-core VM) and reused. A worker builds each task
once (unpickling it; a reasoning-gym task re-creates itself from its spec) and never runs a
completion itself: for every chunk of (problem, completion) pairs it receives (`chunk_size`, default
64) it forks a scorer process that confines itself further, scores the chunk, streams one result per
call back and exits. Whatever a completion does to the scorer's memory (a monkeypatched
`score_answer` that returns 1 from then on) dies with that process, so it can reach at most the rest
of its own chunk; a completion the audit hook catches ends the scorer process at once, so it reaches
nothing. `fork_per_chunk=False` lets the worker score itself instead: cheaper (no fork per chunk,
see benchmarks/sandbox_overhead.py), but a tampering completion then reaches every later call of that
worker.

Limits. Each call has a wall-clock limit (`timeout_s`, default 5 s; $UNIPO_REWARD_TIMEOUT_S). A
call that overruns it scores 0 and counts as a timeout; its worker is killed with its whole process
group and replaced, and the rest of the chunk goes on elsewhere. A scorer process that dies (the
CPU limit: a timeout; a crash: an error) or reports a blocked operation costs only its call.

- Worker (before any task is built): its own session, so one `killpg` ends it and all it started;
  SIGKILL when its parent dies (Linux); stdin/stdout/stderr on /dev/null and every other inherited
  file descriptor closed except its end of the pipe; a fresh scratch directory as cwd and TMPDIR,
  removed when the worker goes; RLIMIT_AS = the address space it started with plus `memory_mb`
  (default 2048 MiB; relative because a worker inherits torch's mappings from the fork server; enough
  for sympy and reasoning-gym to import and score), RLIMIT_NOFILE 64, RLIMIT_FSIZE 1 MiB,
  RLIMIT_CORE 0.
- Scorer process, in addition: RLIMIT_CPU `ceil(timeout_s) + 1` s per call (re-armed before each),
  RLIMIT_NPROC 0 (no process or thread creation; root is exempt, hence the next layer), SIGKILL when
  its worker dies; a seccomp filter (Linux x86-64 and aarch64) under which the kernel answers EPERM
  to process creation (clone without CLONE_THREAD, fork, vfork, execve), signals to other processes,
  ptrace, sockets, opening a file for writing and every path-changing call (unlink, rename, mkdir,
  chmod, ...), as root too; and a Python audit hook that refuses the same at the Python level plus
  ctypes, `sys._getframe`, gc's object walks, frame attributes (`tb_frame`, `gi_frame`, ...), writes
  to a function's `__code__`, tracing and `/proc` reads. A call that trips the hook scores 0 and
  counts as an error even if the scorer swallows the PermissionError (rg's countdown catches every
  exception).
- Protocol: the parent never unpickles anything a worker sends. Results are fixed-size binary
  records: an 8-byte random nonce per call that must be echoed (a scorer process cannot answer for
  calls it has not been given without reading the parent's nonces out of its memory), the reward as
  a float64, at most 240 bytes of error text, shown escaped; a task that `returns_text` (tools) also gets
  its text back, at most MAX_RESULT_TEXT (4096) bytes of UTF-8, decoded as text (never evaluated). A
  malformed or unexpected record counts as an error on the call in progress and the worker is replaced.

Not a boundary against everything: the processes run as the same user and can read what that user
can read; the kernel-level layers (process-group kill, rlimits, seccomp, fork per chunk) are the
ones relied on, the audit hook is a second line.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import os
import pickle
import platform
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from unipo.tasks.base import (
    MAX_RESULT_TEXT,
    Problem,
    ScoreResult,
    Task,
    cap_completions,
    check_reward,
    split_text_result,
)

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_MB = 2048
DEFAULT_CHUNK = 64  # (problem, completion) pairs per message to a worker
DEFAULT_LOAD_TIMEOUT_S = 120.0  # building a task in a fresh worker (imports, dataset set-up)
MAX_OPEN_FILES = 64
MAX_FILE_BYTES = 1 << 20
# Imported once, in the fork server, so that workers start without importing them. Each worker still imports the
# main script as multiprocessing always does (a task class defined there must be found), so a script that scores
# an unsafe task needs the usual `if __name__ == "__main__":` guard.
PRELOAD = ["__main__", "unipo.sandbox", "unipo.tasks", "reasoning_gym", "math_verify"]

# Worker -> parent records: kind, status, nonce, reward, text length, then the text: error text (at most
# _MAX_TEXT bytes) or, in a successful result of a `returns_text` task, its text (at most MAX_RESULT_TEXT bytes).
_RECORD = struct.Struct("<BBQdH")
_MAX_TEXT = 240
_MAX_RECORD = _RECORD.size + MAX_RESULT_TEXT
_LOADED, _LOAD_FAILED, _RESULT, _CHUNK_END = 1, 2, 3, 4
_KINDS = (_LOADED, _LOAD_FAILED, _RESULT, _CHUNK_END)
_OK, _ERROR, _BLOCKED = 0, 1, 2
_TASKS_PER_WORKER = 8  # built tasks a worker keeps (least recently used dropped)


class SandboxError(RuntimeError):
    """The sandbox cannot score a task at all (it cannot be pickled, or a worker cannot build it)."""


@dataclass
class _Worker:
    process: Any
    conn: Any
    scratch: str
    loaded: set
    chunk: list  # indices (into the call's items) of the chunk in progress
    done: int = 0  # results received for `chunk`
    state: str = "idle"  # idle | loading | scoring | dead
    deadline: float = math.inf
    nonce: int = 0  # of the load or of the chunk in progress
    stopped: bool = False  # the scorer process reported a blocked call and ends the chunk there


class RewardSandbox:
    """A pool of confined worker processes that score completions (see the module docstring).

    `fork_per_chunk=False` trades the fresh scorer process per chunk (a fork, ~10 ms on a small VM, per
    `chunk_size` calls) for speed: the worker then confines and scores itself, so a completion that alters
    the scorer's memory without tripping the audit hook can reach every later call of that worker.

    `score(task, problems, completions)` -> `ScoreResult`; safe to call from one thread at a time
    (calls are serialised by a lock). `close()` (or leaving a `with` block) stops the workers and
    removes their scratch directories; the process-wide sandbox closes at exit.
    """

    def __init__(self, workers: int | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 memory_mb: int = DEFAULT_MEMORY_MB, chunk_size: int = DEFAULT_CHUNK,
                 load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S, start_method: str | None = None,
                 fork_per_chunk: bool = True) -> None:
        if workers is None:
            workers = max(1, min(4, (os.cpu_count() or 2) // 2))
        if not (isinstance(workers, int) and workers >= 1):
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        if not (timeout_s > 0 and load_timeout_s > 0 and memory_mb > 0 and chunk_size >= 1):
            raise ValueError("timeout_s, load_timeout_s, memory_mb and chunk_size must be positive")
        methods = multiprocessing.get_all_start_methods()
        start_method = start_method or ("forkserver" if "forkserver" in methods else "spawn")
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
        self.n_workers, self.timeout_s, self.memory_mb = workers, float(timeout_s), int(memory_mb)
        self.chunk_size, self.load_timeout_s = chunk_size, float(load_timeout_s)
        self.fork_per_chunk = bool(fork_per_chunk)
        self._context = multiprocessing.get_context(start_method)
        self._workers: list[_Worker] = []
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._tasks: OrderedDict[int, tuple[Task, int, bytes]] = OrderedDict()  # id(task) -> task, key, pickle
        self._next_key = 0
        self.restarts = 0  # workers replaced (after a timeout or a broken protocol)
        self.layers = ""  # the confinement the last started worker reported
        _open_sandboxes.add(self)  # closed at exit if still open: workers stopped, scratch dirs removed

    # -- public -------------------------------------------------------------------------
    def score(self, task: Task, problems: Sequence[Problem], completions: Sequence[str]) -> ScoreResult:
        """Rewards of `task.score(p, c)` for each pair, scored in the workers; completions longer than
        MAX_SCORED_CHARS are cut to their tail first (`score_completions` has done so already)."""
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        if not problems:
            return ScoreResult([])
        capped, truncated = cap_completions(completions)
        with self._lock:
            if os.getpid() != self._owner:  # a forked copy of this object: the workers are not ours
                self._workers, self._owner = [], os.getpid()
            key, blob = self._task_blob(task)
            call = _Call(self, task, key, blob, list(problems), capped)
            try:
                call.run()
            except BaseException:
                for worker in self._workers:  # mid-chunk workers would answer the next call: replace
                    if worker.state != "idle":
                        self._replace(worker)
                raise
            result = call.result()
            result.truncated = truncated
            return result

    def close(self) -> None:
        """Stop the workers (killed if they do not stop within a second) and remove their scratch dirs."""
        with self._lock:
            if os.getpid() != self._owner:  # a forked copy: the workers belong to the parent
                self._workers = []
                return
            for worker in self._workers:
                if worker.state == "idle" and worker.process.is_alive():
                    try:
                        worker.conn.send(("stop",))
                    except (OSError, ValueError):
                        pass
            deadline = time.monotonic() + 1.0
            for worker in self._workers:
                worker.process.join(max(0.0, deadline - time.monotonic()))
                self._kill(worker)
            self._workers = []
            self._tasks.clear()

    def __enter__(self) -> RewardSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- workers ------------------------------------------------------------------------
    def _task_blob(self, task: Task) -> tuple[int, bytes]:
        cached = self._tasks.get(id(task))
        if cached is not None and cached[0] is task:
            self._tasks.move_to_end(id(task))
            return cached[1], cached[2]
        try:
            blob = pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:  # noqa: BLE001 - any pickling failure means the same thing
            raise SandboxError(
                f"task {task.name!r} cannot be sent to the reward sandbox ({type(error).__name__}: {error}); "
                f"make it picklable (or define __reduce__), or set scorer_is_safe = True if its scorer never "
                f"evaluates the completion"
            ) from None
        self._next_key += 1
        self._tasks[id(task)] = (task, self._next_key, blob)  # holding the task keeps its id unique
        while len(self._tasks) > 16:
            self._tasks.popitem(last=False)
        return self._next_key, blob

    def _pool(self) -> list[_Worker]:
        while len(self._workers) < self.n_workers:
            self._workers.append(self._start())
        for i, worker in enumerate(self._workers):
            if worker.state == "idle" and (not worker.process.is_alive() or _has_data(worker.conn)):
                self._workers[i] = self._replace(worker)  # died while idle, or sent what nobody asked for
        return self._workers

    def _start(self) -> _Worker:
        if self._context.get_start_method() == "forkserver":
            _ensure_forkserver()
        scratch = tempfile.mkdtemp(prefix="unipo-sandbox-")
        parent_end, child_end = self._context.Pipe(duplex=True)
        limits = {"timeout_s": self.timeout_s, "memory_mb": self.memory_mb, "fork_per_chunk": self.fork_per_chunk}
        process = self._context.Process(target=_worker_main, args=(child_end, scratch, limits),
                                        name="unipo-reward-sandbox", daemon=True)
        process.start()
        child_end.close()
        return _Worker(process=process, conn=parent_end, scratch=scratch, loaded=set(), chunk=[])

    def _replace(self, worker: _Worker) -> _Worker:
        self._kill(worker)
        self.restarts += 1
        fresh = self._start()
        for i, current in enumerate(self._workers):
            if current is worker:
                self._workers[i] = fresh
        return fresh

    @staticmethod
    def _kill(worker: _Worker) -> None:
        pid = worker.process.pid
        if pid is not None and worker.process.exitcode is None:
            for kill in (os.killpg, os.kill):  # the worker leads its own process group (setsid)
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        worker.process.join(5.0)
        worker.conn.close()
        worker.state = "dead"
        shutil.rmtree(worker.scratch, ignore_errors=True)


class _Call:
    """One `score` call: hands out chunks, reads results, enforces the deadlines."""

    def __init__(self, sandbox: RewardSandbox, task: Task, key: int, blob: bytes,
                 problems: list[Problem], completions: list[str]) -> None:
        self.sandbox, self.task, self.key, self.blob = sandbox, task, key, blob
        self.problems, self.completions = problems, completions
        n = len(problems)
        self.rewards = [0.0] * n
        self.texts: list[str] | None = [""] * n if getattr(task, "returns_text", False) else None
        self.errors = self.timeouts = 0
        self.replaced_in_a_row = 0  # replacements since the last answered call (a guard against a loop)
        self.first_error: str | None = None
        self.nonces = struct.unpack(f"<{n}Q", os.urandom(8 * n))
        size = max(1, min(sandbox.chunk_size, math.ceil(n / sandbox.n_workers)))
        self.pending: deque[list[int]] = deque(list(range(i, min(i + size, n))) for i in range(0, n, size))

    def run(self) -> None:
        from multiprocessing.connection import wait

        box = self.sandbox
        while True:
            workers = box._pool()
            for worker in workers:
                if worker.state == "idle" and self.pending:
                    self._assign(worker, self.pending.popleft())
            busy = [w for w in box._workers if w.state in ("loading", "scoring")]
            if not busy:
                if self.pending:
                    continue
                return
            timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout))
            for worker in busy:
                if worker.conn in ready or worker.process.sentinel in ready:
                    self._read(worker)
            now = time.monotonic()
            for worker in busy:
                if worker.state in ("loading", "scoring") and now > worker.deadline:
                    if worker.state == "loading":
                        self._replaced(worker)
                        raise SandboxError(f"a reward-sandbox worker took more than {box.load_timeout_s:g} s "
                                           f"to build task {self.task.name!r}")
                    self._fail_current(worker, timeout=True, reason=f"no result within {box.timeout_s:g} s")

    def result(self) -> ScoreResult:
        if self.errors or self.timeouts:
            logger.warning("task %s: %d scorer error(s) and %d timeout(s) in the reward sandbox scored 0; first: %s",
                           self.task.name, self.errors, self.timeouts, self.first_error)
        return ScoreResult(self.rewards, self.errors, self.timeouts, texts=self.texts)

    # -- protocol -----------------------------------------------------------------------
    def _assign(self, worker: _Worker, chunk: list[int]) -> None:
        worker.chunk, worker.done, worker.stopped = chunk, 0, False
        worker.nonce = int.from_bytes(os.urandom(8), "little")
        try:
            if self.key not in worker.loaded:  # built once per worker, warmed up on this chunk's first problem
                worker.conn.send(("load", self.key, worker.nonce, self.blob, self.problems[chunk[0]]))
                worker.state, worker.deadline = "loading", time.monotonic() + self.sandbox.load_timeout_s
            else:
                self._send_chunk(worker)
        except (OSError, ValueError):  # it died while idle: nothing of this chunk was started
            self._requeue(chunk)
            self._replaced(worker)

    def _send_chunk(self, worker: _Worker) -> None:
        items = [(self.nonces[i], self.problems[i], self.completions[i]) for i in worker.chunk]
        worker.nonce = int.from_bytes(os.urandom(8), "little")
        worker.conn.send(("score", self.key, worker.nonce, items))
        worker.state, worker.deadline = "scoring", time.monotonic() + self.sandbox.timeout_s

    def _read(self, worker: _Worker) -> None:
        """Every record the worker has sent; then, if it is gone, what it left unfinished."""
        while worker.state in ("loading", "scoring"):
            try:
                if not worker.conn.poll():
                    break
                data = worker.conn.recv_bytes(_MAX_RECORD)
            except EOFError:  # it closed its end: it has exited or is exiting
                worker.process.join(1.0)
                break
            except OSError:  # longer than any valid record: the stream cannot be trusted any more
                self._fail_current(worker, timeout=False, reason="malformed record from the worker")
                return
            record = _decode(data)
            if record is None:
                self._fail_current(worker, timeout=False, reason="malformed record from the worker")
                return
            self._handle(worker, record)
        if worker.state in ("loading", "scoring") and not worker.process.is_alive():
            code = worker.process.exitcode
            if worker.state == "loading":
                self._replaced(worker)
                raise SandboxError(f"a reward-sandbox worker died (exit code {code}) while building task "
                                   f"{self.task.name!r}")
            self._fail_current(worker, timeout=False, reason=f"worker died (exit code {code})")

    def _handle(self, worker: _Worker, record: tuple[int, int, int, float, str]) -> None:
        kind, status, nonce, reward, text = record
        if worker.state == "loading":
            if kind == _LOADED and nonce == worker.nonce:
                worker.loaded.add(self.key)
                self.sandbox.layers = text
                try:
                    self._send_chunk(worker)
                except (OSError, ValueError):  # died right after loading: the chunk was not started
                    self._requeue(worker.chunk)
                    self._replaced(worker)
                return
            if kind == _LOAD_FAILED and nonce == worker.nonce:
                self._replaced(worker)
                raise SandboxError(f"a reward-sandbox worker could not build task {self.task.name!r}: {text}")
            self._fail_current(worker, timeout=False, reason="unexpected record from the worker")
            return
        if kind == _CHUNK_END and nonce == worker.nonce:  # the scorer process has exited
            if worker.done < len(worker.chunk):
                if worker.stopped:
                    self._requeue(worker.chunk[worker.done:])
                else:  # it died in the middle of a call: the CPU limit (SIGXCPU) or a crash
                    code = int(reward) if math.isfinite(reward) else 0
                    self._score_zero(timeout=code == -signal.SIGXCPU, reason=f"scorer process died (exit code "
                                                                            f"{code})")
                    self._requeue(worker.chunk[worker.done + 1:])
            worker.state, worker.deadline = "idle", math.inf
            return
        if (kind != _RESULT or worker.stopped or worker.done >= len(worker.chunk)
                or nonce != self.nonces[worker.chunk[worker.done]] or status not in (_OK, _ERROR, _BLOCKED)):
            self._fail_current(worker, timeout=False, reason="unexpected record from the worker")
            return
        index = worker.chunk[worker.done]
        self.replaced_in_a_row = 0
        if status == _OK:
            try:
                self.rewards[index] = getattr(self.task, "check_score", check_reward)(reward)  # Task.check_score
                if self.texts is not None:
                    self.texts[index] = text
            except (TypeError, ValueError) as error:
                self._error(f"ValueError: {error}")
        else:
            self._error(text if status == _ERROR else f"blocked: {text}")
        worker.done += 1
        worker.stopped = status == _BLOCKED  # the scorer process exits after reporting it
        worker.deadline = time.monotonic() + self.sandbox.timeout_s

    def _fail_current(self, worker: _Worker, *, timeout: bool, reason: str) -> None:
        """The call in progress on `worker` (if any) scores 0; the worker is killed and replaced."""
        if worker.state == "scoring" and worker.done < len(worker.chunk) and not worker.stopped:
            self._score_zero(timeout=timeout, reason=reason)
            self._requeue(worker.chunk[worker.done + 1:])
            self.sandbox._replace(worker)
            self.replaced_in_a_row = 0  # a call was answered (with 0): progress
        else:
            self._requeue(worker.chunk[worker.done:])
            self._replaced(worker)

    def _score_zero(self, *, timeout: bool, reason: str) -> None:
        if timeout:
            self.timeouts += 1
            self.first_error = self.first_error or f"timeout: {reason}"
        else:
            self._error(reason)

    def _replaced(self, worker: _Worker) -> None:
        """Replace a worker; raise if workers keep going away without a single call answered."""
        self.sandbox._replace(worker)
        self.replaced_in_a_row += 1
        if self.replaced_in_a_row > 4 * self.sandbox.n_workers + 8:
            raise SandboxError(f"reward-sandbox workers keep dying without answering (task {self.task.name!r})")

    def _requeue(self, rest: list[int]) -> None:
        if rest:
            self.pending.appendleft(rest)

    def _error(self, text: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or text


def _decode(data: bytes) -> tuple[int, int, int, float, str] | None:
    """A worker's record, or None if it is malformed (never unpickled: plain struct fields)."""
    if len(data) < _RECORD.size:
        return None
    kind, status, nonce, reward, length = _RECORD.unpack_from(data)
    if length > _text_limit(kind, status) or len(data) != _RECORD.size + length or kind not in _KINDS:
        return None
    text = data[_RECORD.size:].decode("utf-8", "replace")
    if kind == _RESULT and status == _OK:  # a text-returning task's result: the text itself
        return kind, status, nonce, reward, text
    return kind, status, nonce, reward, text.encode("unicode_escape").decode("ascii")[:_MAX_TEXT]


def _text_limit(kind: int, status: int) -> int:
    return MAX_RESULT_TEXT if kind == _RESULT and status == _OK else _MAX_TEXT


def _has_data(conn: Any) -> bool:
    try:
        return bool(conn.poll())
    except (OSError, EOFError, ValueError):
        return True


# ----------------------------------------------------------------------------------------
# The process-wide sandbox
# ----------------------------------------------------------------------------------------

_default: RewardSandbox | None = None
_default_lock = threading.Lock()
_open_sandboxes: weakref.WeakSet[RewardSandbox] = weakref.WeakSet()
_forkserver_lock = threading.Lock()


def default_sandbox() -> RewardSandbox:
    """The sandbox `score_completions` uses unless given one; built on first use from the environment:
    $UNIPO_REWARD_TIMEOUT_S (seconds per call), $UNIPO_REWARD_WORKERS, $UNIPO_REWARD_MEMORY_MB."""
    global _default
    with _default_lock:
        if _default is None:
            env = os.environ
            workers = env.get("UNIPO_REWARD_WORKERS")
            _default = RewardSandbox(
                int(workers) if workers else None,
                timeout_s=float(env.get("UNIPO_REWARD_TIMEOUT_S", DEFAULT_TIMEOUT_S)),
                memory_mb=int(env.get("UNIPO_REWARD_MEMORY_MB", DEFAULT_MEMORY_MB)),
            )
        return _default


def configure_default_sandbox(**kwargs: Any) -> RewardSandbox:
    """Replace the process-wide sandbox by `RewardSandbox(**kwargs)` (the old one is closed)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
        _default = RewardSandbox(**kwargs)
        return _default


@atexit.register
def _close_all() -> None:
    for sandbox in list(_open_sandboxes):
        sandbox.close()  # a no-op in a forked copy of the process that made it


def _ensure_forkserver() -> None:
    """Start multiprocessing's fork server once, preloading the scoring stack with BLAS single-threaded."""
    from multiprocessing import forkserver

    with _forkserver_lock:
        multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)  # no effect once started
        single = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        saved = {name: os.environ.get(name) for name in single}
        os.environ.update({k: v for k, v in single.items() if saved[k] is None})
        try:
            forkserver.ensure_running()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)


# ----------------------------------------------------------------------------------------
# The worker
# ----------------------------------------------------------------------------------------


def _worker_main(conn: Any, scratch: str, limits: dict[str, Any]) -> None:
    """Confine this process, build the tasks the parent sends, fork a scorer process per chunk."""
    layers = _confine_worker(conn.fileno(), scratch, limits)
    cpu_per_call = int(math.ceil(limits["timeout_s"])) + 1
    tasks: OrderedDict[int, Task] = OrderedDict()
    state: dict[str, Any] | None = None  # the audit hook's, once this process scores itself (no fork per chunk)
    while True:
        try:
            message = conn.recv()  # from the parent: trusted
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        if message[0] == "load":
            _, key, nonce, blob, problem = message
            try:
                tasks[key] = pickle.loads(blob)  # the parent's own task object, never model output
                # first-call set-up (sympy's caches) done once here, not in every scorer process
                if getattr(tasks[key], "warm_up", True):  # not a user reward function: no extra, unconfined call
                    _warm_up(tasks[key], problem, limits["timeout_s"])
                record = _record(_LOADED, _OK, nonce, 0.0, layers)
            except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises
                record = _record(_LOAD_FAILED, _ERROR, nonce, 0.0, f"{type(error).__name__}: {error}")
            while len(tasks) > _TASKS_PER_WORKER:
                tasks.popitem(last=False)
            conn.send_bytes(record)
            continue
        _, key, nonce, items = message
        task = tasks[key]
        tasks.move_to_end(key)
        if not limits["fork_per_chunk"]:  # this process scores: confined once, ended at the first blocked call
            state = state or _confine_scorer()
            if _score_chunk(conn, task, items, cpu_per_call, state):
                return
            conn.send_bytes(_record(_CHUNK_END, _OK, nonce, 0.0, ""))
            continue
        pid = os.fork()
        if pid == 0:
            try:
                _score_chunk(conn, task, items, cpu_per_call, _confine_scorer())
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        conn.send_bytes(_record(_CHUNK_END, _OK, nonce, float(os.waitstatus_to_exitcode(status)), ""))


def _warm_up(task: Task, problem: Problem, seconds: float) -> None:
    """Score the problem's own gold answer (task data, not model output), bounded by an alarm."""
    def stop(*_: object) -> None:
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        task.score(problem, problem.answer)
    except BaseException:  # noqa: BLE001 - a warm-up only
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _confine_scorer() -> dict[str, Any]:
    """What a scorer process adds to its worker's confinement; returns the audit hook's state."""
    import resource

    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the worker
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    except (OSError, ValueError):
        pass
    _install_seccomp()
    state: dict[str, Any] = {"phase": "idle", "blocked": None}  # reachable only from the caller and the hook
    _install_audit_hook(state)
    return state


def _score_chunk(conn: Any, task: Task, items: list, cpu_per_call: int, state: dict[str, Any]) -> bool:
    """Score each call and send its record; stop at a blocked call (True: this process must end)."""
    for nonce, problem, completion in items:
        _limit_cpu(cpu_per_call)
        state["phase"] = "scoring"
        try:
            value, text = task.score(problem, completion), ""
            if getattr(task, "returns_text", False):
                value, text = split_text_result(value)
            reward, status = float(value), _OK
        except BaseException as error:  # noqa: BLE001 - SystemExit and MemoryError included
            reward, status, text = 0.0, _ERROR, f"{type(error).__name__}: {error}"
        state["phase"] = "idle"
        if state["blocked"] is not None:
            reward, status, text = 0.0, _BLOCKED, str(state["blocked"])
        conn.send_bytes(_record(_RESULT, status, nonce, reward, text))
        if status == _BLOCKED:
            return True
    return False


def _record(kind: int, status: int, nonce: int, reward: float, text: str) -> bytes:
    data = text.encode("utf-8", "replace")[:_text_limit(kind, status)]
    return _RECORD.pack(kind, status, nonce, reward, len(data)) + data


def _limit_cpu(seconds: int) -> None:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(usage.ru_utime + usage.ru_stime) + seconds
    if hard == resource.RLIM_INFINITY or soft <= hard:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _confine_worker(conn_fd: int, scratch: str, limits: dict[str, Any]) -> str:
    """Session, parent-death signal, file descriptors, cwd, resource limits; returns what took effect."""
    import resource

    layers = []
    try:
        os.setsid()
        layers.append("session")
    except OSError:
        pass
    if _prctl(1, signal.SIGKILL):  # PR_SET_PDEATHSIG
        layers.append("pdeathsig")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, conn_fd)
    os.closerange(conn_fd + 1, max(conn_fd + 1, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 4096))
    layers.append("fds")
    os.chdir(scratch)
    os.environ["TMPDIR"] = tempfile.tempdir = scratch
    sys.dont_write_bytecode = True
    logging.disable(logging.CRITICAL)
    import warnings

    warnings.simplefilter("ignore")
    address_space = _address_space()
    settings = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, MAX_OPEN_FILES),
                (resource.RLIMIT_FSIZE, MAX_FILE_BYTES)]
    if address_space:
        settings.append((resource.RLIMIT_AS, address_space + limits["memory_mb"] * (1 << 20)))
    for which, value in settings:
        _, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        try:
            resource.setrlimit(which, (value, value))
        except (OSError, ValueError):
            continue
    layers.append("rlimits")
    if limits["fork_per_chunk"]:
        layers.append("fork-per-chunk")
    if _seccomp_works():
        layers.append("seccomp")
    layers.append("audit")
    return ",".join(layers)


def _seccomp_works() -> bool:
    """Whether a forked process can load the filter (and is then refused a fork): one probe per worker."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if _install_seccomp():
                try:
                    os.fork()  # must be refused; if not, the (empty) child exits at once
                    code = 2
                except OSError:
                    code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _address_space() -> int:
    """This process's mapped address space in bytes (Linux), else 0."""
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _prctl(*args: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(*(ctypes.c_ulong(a) for a in args)) == 0
    except (OSError, AttributeError):
        return False


def _install_audit_hook(state: dict[str, Any]) -> None:
    """Refuse effects (processes, writes, network, ctypes, signals) always, and introspection while a
    call is scored; a refusal during a call is recorded in `state["blocked"]`. Installed in each scorer
    process only (a worker needs fork); a hook cannot be removed once added."""
    effects = frozenset({
        "os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "os.remove",
        "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.chflags", "os.lchflags", "os.link",
        "os.symlink", "os.truncate", "os.utime", "os.chdir", "os.setxattr", "os.removexattr", "os.startfile",
        "sys.addaudithook", "builtins.input", "builtins.breakpoint", "pty.spawn", "resource.prlimit",
    })
    effect_prefixes = ("os.exec", "os.spawn", "os.posix_spawn", "subprocess.", "socket.", "ctypes.", "shutil.",
                       "tempfile.", "sqlite3.", "webbrowser.", "urllib.", "http.", "ftplib.", "smtplib.", "poplib.",
                       "imaplib.", "nntplib.", "telnetlib.", "syslog.", "_winapi.", "winreg.", "msvcrt.")
    introspection = frozenset({
        "sys._getframe", "sys._current_frames", "sys._current_exceptions", "sys.settrace", "sys.setprofile",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "code.__new__", "function.__new__",
        "resource.setrlimit",
    })
    # sympy reads functions' __code__/__defaults__ and sets a class's __name__ when it first runs: allowed
    frame_attributes = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back", "f_locals", "f_globals"})
    function_writes = frozenset({"__code__", "__defaults__", "__kwdefaults__", "__globals__", "__closure__"})
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    realpath, fspath = os.path.realpath, os.fspath

    def refuse(event: str) -> None:
        if state["phase"] == "scoring" and state["blocked"] is None:
            state["blocked"] = event
        raise PermissionError(f"{event} is not allowed in the reward sandbox")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            mode, flags = (args[1], args[2]) if len(args) > 2 else (None, 0)
            if (isinstance(flags, int) and flags & write_flags) or (
                    isinstance(mode, str) and any(c in mode for c in "wax+")):
                refuse("open for writing")
            if state["phase"] == "scoring" and not isinstance(args[0], int):
                try:
                    path = realpath(fspath(args[0]))
                except (TypeError, ValueError, OSError):
                    path = ""
                if path.startswith("/proc"):
                    refuse("open /proc")
            return
        if event in effects or event.startswith(effect_prefixes):
            refuse(event)
        if state["phase"] != "scoring":
            return
        if event in introspection:
            refuse(event)
        if event == "object.__getattr__" and len(args) > 1 and args[1] in frame_attributes:
            refuse(f"reading {args[1]}")
        if event in ("object.__setattr__", "object.__delattr__") and len(args) > 1 and args[1] in function_writes:
            refuse(f"writing {args[1]}")

    sys.addaudithook(hook)


# seccomp-bpf: (audit arch, {name: number}) per machine; names absent on a machine are simply not listed.
_SYSCALLS = {
    "x86_64": (0xC000003E, {
        "clone": 56, "fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "clone3": 435, "kill": 62, "tkill": 200,
        "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297, "pidfd_send_signal": 424,
        "pidfd_open": 434, "pidfd_getfd": 438, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
        "socket": 41, "socketpair": 53, "connect": 42, "accept": 43, "accept4": 288, "bind": 49, "listen": 50,
        "setpgid": 109, "setsid": 112, "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "chroot": 161,
        "pivot_root": 155, "open": 2, "openat": 257, "openat2": 437, "creat": 85, "unlink": 87, "unlinkat": 263,
        "rename": 82, "renameat": 264, "renameat2": 316, "mkdir": 83, "mkdirat": 258, "rmdir": 84, "link": 86,
        "linkat": 265, "symlink": 88, "symlinkat": 266, "chmod": 90, "fchmod": 91, "fchmodat": 268, "chown": 92,
        "fchown": 93, "lchown": 94, "fchownat": 260, "truncate": 76, "mknod": 133, "mknodat": 259,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "bpf": 321, "perf_event_open": 298,
        "userfaultfd": 323, "keyctl": 250, "add_key": 248, "request_key": 249, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320, "reboot": 169,
        "acct": 163, "swapon": 167, "swapoff": 168, "sethostname": 170, "setdomainname": 171, "settimeofday": 164,
        "clock_settime": 227,
    }),
    "aarch64": (0xC00000B7, {
        "clone": 220, "execve": 221, "execveat": 281, "clone3": 435, "kill": 129, "tkill": 130, "tgkill": 131,
        "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240, "pidfd_send_signal": 424, "pidfd_open": 434,
        "pidfd_getfd": 438, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "socket": 198,
        "socketpair": 199, "connect": 203, "accept": 202, "accept4": 242, "bind": 200, "listen": 201,
        "setpgid": 154, "setsid": 157, "unshare": 97, "setns": 268, "mount": 40, "umount2": 39, "chroot": 51,
        "pivot_root": 41, "openat": 56, "openat2": 437, "unlinkat": 35, "renameat": 38, "renameat2": 276,
        "mkdirat": 34, "linkat": 37, "symlinkat": 36, "fchmod": 52, "fchmodat": 53, "fchown": 55, "fchownat": 54,
        "truncate": 45, "mknodat": 33, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "keyctl": 219, "add_key": 217,
        "request_key": 218, "init_module": 105, "finit_module": 273, "delete_module": 106, "kexec_load": 104,
        "kexec_file_load": 294, "reboot": 142, "acct": 89, "swapon": 224, "swapoff": 225, "sethostname": 161,
        "setdomainname": 162, "settimeofday": 170, "clock_settime": 112,
    }),
}
_CLONE_THREAD = 0x00010000
_WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000  # O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND
_ENOSYS_CALLS = ("clone3", "openat2")  # their flags sit behind a pointer: ENOSYS makes libc fall back


def _seccomp_program(machine: str, pid: int) -> list[tuple[int, int, int, int]] | None:
    """The BPF program (code, jt, jf, k) of the filter described in the module docstring, or None."""
    if machine not in _SYSCALLS:
        return None
    arch, nr = _SYSCALLS[machine]
    ld, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    # (code, true-label, false-label, k); labels resolve to relative jumps below
    prog: list[tuple[int, object, object, int]] = [
        (ld, 0, 0, 4), (jeq, 0, "deny", arch), (ld, 0, 0, 0), (jge, "deny", 0, 0x40000000),
    ]
    checks = {"clone": "clone", "kill": "pid", "tkill": "pid", "tgkill": "pid", "openat": "flags2",
              "open": "flags1"}
    for name, number in nr.items():
        if name in checks:
            prog.append((jeq, checks[name], 0, number))
        else:
            prog.append((jeq, "nosys" if name in _ENOSYS_CALLS else "deny", 0, number))
    prog.append((ret, 0, 0, allow))
    labels = {}
    blocks = {
        "clone": [(ld, 0, 0, 16), (jset, "allow", "deny", _CLONE_THREAD)],
        "pid": [(ld, 0, 0, 16), (jeq, "allow", "deny", pid)],
        "flags2": [(ld, 0, 0, 32), (jset, "deny", "allow", _WRITE_FLAGS)],
        "flags1": [(ld, 0, 0, 24), (jset, "deny", "allow", _WRITE_FLAGS)],
        "allow": [(ret, 0, 0, allow)], "deny": [(ret, 0, 0, eperm)], "nosys": [(ret, 0, 0, enosys)],
    }
    for label, block in blocks.items():
        labels[label] = len(prog)
        prog.extend(block)
    resolved = []
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        if not (0 <= jt <= 255 and 0 <= jf <= 255):
            return None
        resolved.append((code, jt, jf, k))
    return resolved


def _install_seccomp() -> bool:
    """Load the seccomp filter into this (single-threaded) process; False where unsupported."""
    program = _seccomp_program(platform.machine(), os.getpid()) if sys.platform.startswith("linux") else None
    if program is None:
        return False
    import ctypes

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(program))(*program)
    fprog = SockFprog(len(program), filters)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(ctypes.c_int(38), ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)) != 0:  # PR_SET_NO_NEW_PRIVS
            return False
        return libc.prctl(ctypes.c_int(22), ctypes.c_ulong(2), ctypes.byref(fprog), ctypes.c_ulong(0),
                          ctypes.c_ulong(0)) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    except (OSError, AttributeError):
        return False
