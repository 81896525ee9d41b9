"""Evaluation.

The top of this file is pure maths on plain Python values (no model, no torch): the unbiased
pass@k estimator. Model-driven evaluation builds on it further down.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

# --------------------------------------------------------------------------------------------
# pass@k (pure)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., arXiv 2107.03374, Sec. 2.1):

        pass@k = 1 − C(n − c, k) / C(n, k)

    the probability that a k-subset drawn without replacement from the n samples holds at
    least one correct one. Evaluated as the stable product 1 − Π_{i=n−c+1}^{n} (1 − k/i),
    since the binomials overflow floats for n in the hundreds. k > n is a ValueError (the
    estimator is undefined there), as are c outside [0, n] and k < 1.
    """
    for label, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{label} must be an int, got {value!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"pass@k needs k <= n samples, got k={k} > n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if n - c < k:  # every k-subset must contain a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_table(correct: Sequence[Sequence[bool]], ks: Iterable[int]) -> dict[int, float]:
    """Mean over problems of `pass_at_k(n_p, c_p, k)` for each k in `ks`.

    `correct[p]` holds one bool per sample of problem p; problems may have different sample
    counts, but every one needs at least max(ks) samples (ValueError naming the problem).
    """
    if len(correct) == 0:
        raise ValueError("pass_at_k_table needs at least one problem")
    k_values = list(dict.fromkeys(ks))
    if not k_values:
        raise ValueError("pass_at_k_table needs at least one k")
    counts = [(len(samples), sum(bool(s) for s in samples)) for samples in correct]
    table: dict[int, float] = {}
    for k in k_values:
        total = 0.0
        for problem, (n, c) in enumerate(counts):
            try:
                total += pass_at_k(n, c, k)
            except ValueError as error:
                raise ValueError(f"problem {problem}: {error}") from None
        table[k] = total / len(counts)
    return table


# --------------------------------------------------------------------------------------------
# model-driven evaluation


def evaluate_model(model, tokenizer, task, *, n: int, ks: Sequence[int] = (1,), seed: int = 0,
                   max_new_tokens: int, temperature: float = 1.0, chunk_prompts: int = 64) -> dict[str, float]:
    """Greedy accuracy and unbiased pass@k on `n` problems of the task's test split.

    Greedy decoding gives `accuracy` (fully correct answers); `max(ks)` samples per problem at
    `temperature` give `pass@k` for each k (Chen et al., arXiv 2107.03374). Completions are scored
    by `score_completions`: in the reward sandbox unless the task's scorer is known safe.
    """
    import torch

    from unipo.models import format_prompt
    from unipo.rollout import generate
    from unipo.tasks.base import score_completions

    problems = task.sample(n, seed=seed, split="test")
    samples = max(ks)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    was_training = model.training
    model.eval()
    greedy_scores: list[float] = []
    sampled_correct: list[list[bool]] = []
    lengths: list[float] = []
    for start in range(0, len(problems), chunk_prompts):
        chunk = problems[start:start + chunk_prompts]
        prompts = [tokenizer(format_prompt(tokenizer, p.prompt), add_special_tokens=False)["input_ids"]
                   for p in chunk]
        for greedy, group in ((True, 1), (False, samples)):
            gen = generate(model, prompts, group_size=group, max_new_tokens=max_new_tokens, eos_token_id=eos,
                           pad_token_id=pad, temperature=temperature, greedy=greedy, generator=generator)
            texts = tokenizer.batch_decode(gen.completion_ids, skip_special_tokens=True)
            scores = score_completions(task, [p for p in chunk for _ in range(group)], texts).rewards
            if greedy:
                greedy_scores += scores
                lengths += gen.completion_mask.sum(1).float().tolist()
            else:
                sampled_correct += [[s >= 1.0 for s in scores[i * group:(i + 1) * group]]
                                    for i in range(len(chunk))]
    model.train(was_training)
    result = {"accuracy": sum(s >= 1.0 for s in greedy_scores) / len(greedy_scores)}
    result.update({f"pass@{k}": v for k, v in pass_at_k_table(sampled_correct, ks).items()})
    result["response_len_mean"] = sum(lengths) / len(lengths)
    return result
