"""Any reasoning-gym dataset as a task: spec `"rg:<dataset>"` or `"rg:<dataset>:key=value,..."`.

reasoning-gym (github.com/open-thought/reasoning-gym) generates problems procedurally and
scores answers with each dataset's own `score_answer`, so it runs offline. Its prompts are
long natural-language questions meant for chat models, not the tiny char-level default.

Several of those scorers run the answer as code (`eval` in spiral_matrix, binary_matrix, n_queens,
string_insertion; sympy's `parse_expr` in countdown, puzzle24, polynomial_multiplication, the
integration tasks), so no rg task is `scorer_is_safe`: `score_completions` scores them in the
reward sandbox, whose workers re-create the task from its spec (`__reduce__`).
"""

from __future__ import annotations

from typing import Any

from unipo.tasks.base import TASKS, Problem, Task, check_sample_args, derive_seed, extract_answer, split_of

_CHUNK_MIN = 64  # entries generated per chunk at least
_MAX_CHUNKS = 1000


@TASKS.register("rg")
class ReasoningGymTask(Task):
    """Problems from `reasoning_gym.create_dataset(dataset, seed=..., size=..., **config)`.

    prompt = the entry's question; answer = demonstration = the entry's answer (None when the
    dataset has no single oracle answer); `meta["entry"]` is the whole entry, which
    `score_answer` needs. Reward = `score_answer(answer=extract_answer(completion), entry=entry)`
    (some datasets give partial credit). Problems are generated in chunks whose dataset seed is
    derived from (seed, chunk index) and filtered into the split by prompt hash.
    """

    scorer_is_safe = False  # some score_answer() evaluate the answer as Python or parse it with sympy

    def __init__(self, dataset: str = "", max_new_tokens: int = 512, **config: Any) -> None:
        import reasoning_gym  # imported here: ~2 s, and only rg tasks need it

        names = sorted(reasoning_gym.factory.DATASETS)
        if dataset not in names:
            raise ValueError(f"unknown reasoning-gym dataset {dataset!r}; valid: {', '.join(names)}")
        self.name = f"rg:{dataset}"
        self.dataset = dataset
        self.config = config
        self.max_new_tokens = max_new_tokens
        self._create = reasoning_gym.create_dataset
        # score_answer reads the entry and at most the dataset's config, so one instance scores all
        self._scorer = self._make(seed=0, size=1)

    def __reduce__(self) -> tuple:
        """Pickled as its spec (dataset, max_new_tokens, config): a sandbox worker builds its own."""
        return (_rebuild, (self.dataset, self.max_new_tokens, dict(self.config)))

    def _make(self, *, seed: int, size: int) -> Any:
        try:
            return self._create(self.dataset, seed=seed, size=size, **self.config)
        except TypeError as error:  # an unknown config key: say so in our error type
            raise ValueError(f"{self.name}: bad dataset config {self.config}: {error}") from None

    def sample(self, n: int, *, seed: int, split: str = "train") -> list[Problem]:
        check_sample_args(n, split)
        problems: list[Problem] = []
        chunk_size = max(_CHUNK_MIN, 2 * n)
        for chunk in range(_MAX_CHUNKS):
            if len(problems) == n:
                return problems
            entries = self._make(seed=derive_seed(self.name, seed, chunk), size=chunk_size)
            for index in range(chunk_size):  # entries are generated lazily by index
                entry = entries[index]
                if split_of(entry["question"]) == split:
                    problems.append(self._problem(entry))
                    if len(problems) == n:
                        break
        if len(problems) < n:
            raise ValueError(f"{self.name}: found only {len(problems)} of {n} {split!r} problems")
        return problems

    @staticmethod
    def _problem(entry: dict[str, Any]) -> Problem:
        answer = entry.get("answer")
        answer = None if answer is None else str(answer)
        return Problem(prompt=entry["question"], answer=answer or "", demonstration=answer, meta={"entry": entry})

    def score(self, problem: Problem, completion: str) -> float:
        return float(self._scorer.score_answer(answer=extract_answer(completion), entry=problem.meta["entry"]))


def _rebuild(dataset: str, max_new_tokens: int, config: dict[str, Any]) -> ReasoningGymTask:
    return ReasoningGymTask(dataset, max_new_tokens, **config)
