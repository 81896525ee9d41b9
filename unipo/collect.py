"""Rollout collection: prompts -> completions (rollouts, expert traces, hinted re-rolls) -> rewards.

Produces one `RolloutBatch`, the typed record that travels from collection to the update.
Which rows exist is the recipe's data-source slot: `G - expert_per_group` rollouts per prompt (or G,
with `expert_in_addition`), `expert_per_group` copies of the task's demonstration, or demonstrations of
other prompts as a fraction of the batch (`expert_batch_frac`), GHPO hints for groups that all failed,
and DAPO's dynamic sampling refill. No algorithm is named here.

Pair sources (`recipe.data` in `PAIR_SOURCES`) give (chosen, rejected) pairs, each as 2 consecutive rows,
chosen first, with `group_ids` = `prompt_index` = the pair's index and `rewards` = the row's preference target:
- `pairs`: offline pairs from `TrainConfig.pairs` (loaded once, `unipo.pairs.load_pairs`), a seeded sample of
  `prompts_per_step` pairs a step (without replacement when the data has that many); targets 1 / 0;
- `online_pairs`: `group_size` samples per task prompt from the current policy, judged by the preference oracle
  (`unipo.oracles`, `TrainConfig.oracle`); chosen = the sample with the highest estimated win rate against the
  others, rejected = the lowest (first on ties); targets 1 / 0. A prompt whose samples all tie gives no pair and
  is counted (`rollout/tied_prompts`). With group_size 2 this is online DPO's judged pair (arXiv 2402.04792);
- `spin`: chosen = the task's demonstration, rejected = one own sample (SPIN, arXiv 2401.01335); targets 1 / 0;
- `self_play`: as online_pairs, with the two samples' estimated win rates P(y > pi) (the mean of the oracle's
  P(y > y') over the other samples) as targets (SPPO, arXiv 2405.00675).
- `turn_pairs`: the step's multi-turn episodes teach the recipe's critic (its stateful baseline, handed over by the
  trainer); at each turn state the policy took, fresh candidate actions ranked by the critic give (higher, lower)
  pairs; targets 1 / 0 (SWEET-RL, arXiv 2503.15478; `unipo.sweet`).
For online_pairs and self_play, `recipe.pair_with_demonstration` adds the task's demonstration to each prompt's
candidates (it may be chosen, or rejected, like any sample) and `recipe.pair_min_margin` drops pairs whose win
rates differ by less (`rollout/small_margin_prompts`): DNO's practical algorithm (arXiv 2404.03715).
Rows the policy did not sample (offline answers, demonstrations) are `off_policy`; its own samples keep their
`sampling_logp`. `rollout/sampled_reward_mean` is the task reward of every sample drawn for pairs (the step's
`reward_mean` is over the kept rows' preference targets).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields

import torch

from unipo.config import PAIR_SOURCES, Recipe, RolloutConfig
from unipo.core.hybrid import ghpo_hint_fraction, ghpo_needs_hint
from unipo.core.selection import informative_groups, overlong_reward_penalty
from unipo.engine.native import NativeEngine
from unipo.models import format_prompt
from unipo.rewards import RewardFunctions
from unipo.rollout import pad_sequences
from unipo.tasks.base import Problem, Task, extract_answer, score_completions


@dataclass
class RolloutBatch:
    """B rows of (prompt, completion) with everything the update needs. Row tensors are [B]."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, T) right-padded
    completion_mask: torch.Tensor  # (B, T) 1 on completion tokens incl. EOS
    sampling_logp: torch.Tensor  # (B, T) log-prob under the sampler; 0 on expert rows
    rewards: torch.Tensor  # (B,) task reward plus shaping
    correct: torch.Tensor  # (B,) bool: task reward is full marks
    group_ids: torch.Tensor  # (B,) advantage groups
    prompt_index: torch.Tensor  # (B,) which prompt of the step
    off_policy: torch.Tensor  # (B,) bool: expert trace, not sampled from the policy
    truncated: torch.Tensor  # (B,) bool: hit max_new_tokens without EOS
    answer_ids: torch.Tensor  # (B,) cluster id of the extracted final answer
    hinted: torch.Tensor  # (B,) bool: rolled out with a GHPO hint in the prompt
    texts: list[str]  # completion text as scored (a GHPO hint is part of the prompt, not of this)
    prompts: list[str]  # the task prompt of each row (the key of per-prompt state)
    reward_errors: int = 0
    reward_timeouts: int = 0  # scorer calls that overran the reward sandbox's time limit (scored 0)
    # multi-turn episodes (recipe.data=episodes, unipo.agents): one row per turn; None in a single-turn batch
    episode_ids: torch.Tensor | None = None  # (B,) the row's episode
    turn_index: torch.Tensor | None = None  # (B,) the row's turn in its episode, from 0
    turn_rewards: torch.Tensor | None = None  # (B,) the environment's reward for that turn
    episode_rewards: torch.Tensor | None = None  # (B,) the episode's final (outcome) reward
    info_gain: torch.Tensor | None = None  # (B,) IGPO's information gain of the turn (when a slot asks for it)
    tree_ids: torch.Tensor | None = None  # (B,) recipe.data=tree_episodes: the search tree of the row's episode
    # privileged training-time information of each row's problem (its gold answer): what a critic that sees more
    # than the policy reads (SWEET-RL); never shown to the policy. Episode batches carry it; None elsewhere.
    references: list[str] | None = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def rows(self, index: torch.Tensor) -> RolloutBatch:
        """A sub-batch of the given rows (a LongTensor or bool mask)."""
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                picked[f.name] = value[index.to(value.device)]
            elif isinstance(value, list):
                picked[f.name] = [value[i] for i in index.tolist()]
            else:
                picked[f.name] = value
        return RolloutBatch(**picked)

    @staticmethod
    def concat(batches: list[RolloutBatch]) -> RolloutBatch:
        """Stack batches, left-padding prompts and right-padding completions to common widths."""
        width_p = max(b.prompt_ids.shape[1] for b in batches)
        width_t = max(b.completion_ids.shape[1] for b in batches)
        out = {}
        for f in fields(RolloutBatch):
            values = [getattr(b, f.name) for b in batches]
            if f.name in ("prompt_ids", "prompt_mask"):
                out[f.name] = torch.cat([_pad(v, width_p, left=True) for v in values])
            elif f.name in ("completion_ids", "completion_mask", "sampling_logp"):
                out[f.name] = torch.cat([_pad(v, width_t, left=False) for v in values])
            elif isinstance(values[0], torch.Tensor):
                out[f.name] = torch.cat(values)
            elif isinstance(values[0], list):
                out[f.name] = [x for v in values for x in v]
            elif any(v is None for v in values):  # an episode field of a single-turn batch
                out[f.name] = None
            else:
                out[f.name] = sum(values)
        return RolloutBatch(**out)


def _pad(t: torch.Tensor, width: int, *, left: bool, value: int = 0) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value)


class RolloutCollector:
    """Turns a step's prompts into a scored `RolloutBatch` following the recipe's data slot."""

    def __init__(self, model, tokenizer, task: Task, recipe: Recipe, rollout: RolloutConfig,
                 *, max_new_tokens: int, device: torch.device, generator: torch.Generator,
                 shard: tuple[int, int] = (0, 1), engine=None, pairs: str | None = None,
                 oracle: str = "task", reference=None, env: str | None = None, critic=None,
                 gather=None) -> None:
        self.model, self.tokenizer, self.task, self.recipe = model, tokenizer, task, recipe
        # pair sources: the offline pairs' source (loaded on first use) and the preference oracle's spec
        self.pairs_source, self.oracle_spec = pairs, oracle
        self.reference = reference  # nash_md: the mixture's other model
        self.env = env  # recipe.data=episodes or tree_episodes: the environment's name (unipo.envs)
        # the trainer's stateful baseline (unipo.critics): turn_pairs' critic learns from the step's episodes and
        # ranks candidate actions during collection (unipo.sweet)
        self.critic = critic
        # batch -> the global batch (every rank's rows; `unipo.distributed.gather_batch`) in a multi-process run:
        # turn_pairs' critic learns from every rank's episodes, so its replicas stay equal
        self.gather = gather
        self._episode_file = None  # (path, its episodes by problem): turn_pairs' recorded file (unipo.episode_files)
        self._pairs = None
        self._oracle = None
        self._tied = 0  # prompts whose samples all tied this step (no pair)
        self._small_margin = 0  # prompts whose best and worst differ by less than recipe.pair_min_margin
        self._sampled: list[float] = []  # the task rewards of every sample drawn this step for pairs
        self.engine = engine if engine is not None else NativeEngine(model)  # who samples (unipo.engine)
        # (rank, world size): this process collects prompts rank, rank + N, ... of each step's draw, so each
        # advantage group stays on one rank (unipo.distributed)
        self.rank, self.world_size = shard
        self.cfg, self.max_new_tokens, self.device, self.generator = rollout, max_new_tokens, device, generator
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self._reward_timeouts = 0  # summed by `_score` over one `collect`
        # rollout.reward: user functions added to the verifier's reward, run in the reward sandbox (unipo.rewards)
        if rollout.reward and recipe.data in PAIR_SOURCES:
            raise ValueError(f"rollout.reward scores rollouts; recipe {recipe.name} trains on preference pairs")
        self.reward_functions = RewardFunctions(rollout.reward) if rollout.reward else None
        self._user_stats: dict[str, float] = {}  # summed by `_score` over one `collect`

    # -- public -------------------------------------------------------------------------
    def collect(self, *, seed: int, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        """One step's batch (this rank's share of it); with dynamic sampling, refilled with informative groups."""
        want_all = math.ceil(self.recipe.prompt_multiplier * self.cfg.prompts_per_step)
        want = len(range(self.rank, want_all, self.world_size))
        if self.rank > 0:  # rank 0 keeps one process's stream; the others draw from (seed, step, rank)
            self.generator.manual_seed(_mix_seed(seed, step, 1_000_000 + self.rank))
        self._reward_timeouts = 0
        self._user_stats = {}
        self._tied, self._small_margin, self._sampled = 0, 0, []
        if self.recipe.data == "episodes":  # multi-turn episodes against an environment (unipo.agents)
            from unipo.agents import collect_episodes

            return collect_episodes(self, seed=seed, step=step)
        if self.recipe.data == "tree_episodes":  # the same, grown as search trees (unipo.trees)
            from unipo.trees import collect_tree_episodes

            return collect_tree_episodes(self, seed=seed, step=step)
        if self.recipe.data == "turn_pairs":  # SWEET-RL's critic-ranked pairs of actions at turn states
            from unipo.sweet import collect_turn_pairs

            return collect_turn_pairs(self, seed=seed, step=step)
        if self.recipe.data == "pairs":
            return self._offline_pairs(seed, step, want_all)
        kept: list[RolloutBatch] = []
        n_groups = tries = generated_groups = 0
        while n_groups < want:
            draw = self.task.sample(want_all, seed=_mix_seed(seed, step, tries), split="train")
            problems = draw[self.rank::self.world_size]
            batch = self._rollout(problems, first_index=generated_groups)
            generated_groups += len(problems)
            if self.recipe.dynamic_sampling:
                on = ~batch.off_policy
                # DAPO filters on accuracy (its `metric: acc`), not on the shaped reward: an overlong
                # penalty must not make an all-correct group look informative.
                informative = informative_groups(batch.correct[on].float(), batch.prompt_index[on])
                good_prompts = batch.prompt_index[on][informative].unique()
                batch = batch.rows(torch.isin(batch.prompt_index, good_prompts))
            if len(batch):
                kept.append(batch)
                n_groups += int(batch.prompt_index.unique().numel())
            tries += 1
            if not self.recipe.dynamic_sampling or tries > self.cfg.max_resample_tries:
                break
        stats = {"rollout/generation_rounds": float(tries), "rollout/groups_kept": float(n_groups),
                 "rollout/reward_timeouts": float(self._reward_timeouts)}
        if self.recipe.data in PAIR_SOURCES:
            stats.update({"rollout/pairs": 0.0, "rollout/tied_prompts": float(self._tied),
                          "rollout/small_margin_prompts": float(self._small_margin)})
        if not kept:
            return self._empty(), stats
        batch = RolloutBatch.concat(kept)
        # Keep exactly `want` groups (the last round may overshoot) and renumber prompts 0..n-1.
        prompts = batch.prompt_index.unique()[:want]
        batch = batch.rows(torch.isin(batch.prompt_index, prompts))
        renumber = torch.searchsorted(prompts, batch.prompt_index)
        private = batch.group_ids < 0  # expert rows kept out of the rollouts' group
        batch.prompt_index = renumber
        batch.group_ids = torch.where(private, -(renumber + 1), renumber)
        if self.recipe.expert_batch_frac:
            batch = RolloutBatch.concat([batch, self._separate_expert_rows(len(batch), seed, step, len(prompts))])
        stats["rollout/reward_timeouts"] = float(self._reward_timeouts)
        stats.update(self._user_metrics())
        batch.reward_timeouts = self._reward_timeouts
        if self.recipe.data == "nash_md":  # rewards are P(sample > mixture sample); the task's, here
            stats["rollout/sampled_reward_mean"] = sum(self._sampled) / max(1, len(self._sampled))
        if self.recipe.data in PAIR_SOURCES:
            stats.update({"rollout/pairs": float(len(batch) // 2), "rollout/tied_prompts": float(self._tied),
                          "rollout/small_margin_prompts": float(self._small_margin),
                          "rollout/sampled_reward_mean": sum(self._sampled) / max(1, len(self._sampled))})
        return batch, stats

    # -- internals ----------------------------------------------------------------------
    def _encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer(format_prompt(self.tokenizer, text), add_special_tokens=False)["input_ids"]

    def _encode_completion(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]

    def _rollout(self, problems: list[Problem], first_index: int) -> RolloutBatch:
        r, n_expert = self.recipe, self.recipe.expert_per_group
        if r.data in PAIR_SOURCES:
            return self._fresh_pairs(problems, first_index)
        if r.data == "nash_md":
            return self._against_mixture(problems, first_index)
        if r.data == "expert":
            n_policy = 0
        elif r.data == "on_policy" or r.expert_in_addition or r.expert_batch_frac:
            n_policy = self.cfg.group_size
        else:
            n_policy = self.cfg.group_size - n_expert
        if r.expert_batch_frac:
            n_expert = 0  # the expert rows come from other prompts (`_separate_expert_rows`)
        prompts = [self._encode_prompt(p.prompt) for p in problems]
        parts = []
        if n_policy:
            parts.append(self._sample(problems, prompts, list(range(len(problems))), n_policy, first_index))
            if self.recipe.hint_fractions:
                parts[0] = self._hint_failed_groups(problems, prompts, parts[0], n_policy, first_index)
        if n_expert:
            parts.append(self._expert_rows(problems, prompts, n_expert, first_index))
        batch = RolloutBatch.concat(parts)
        answers = [extract_answer(t) for t in batch.texts]
        ids = {a: i for i, a in enumerate(dict.fromkeys(answers))}
        batch.answer_ids = torch.tensor([ids[a] for a in answers], device=self.device)
        return batch

    def _sample(self, problems, prompts, which: list[int], n: int, first_index: int,
                hints: list[str] | None = None) -> RolloutBatch:
        """n rollouts for each prompt in `which`; with `hints`, each hint goes into the user message after the
        recipe's `hint_template` sentence (GHPO), and only the completion is scored and trained on."""
        if hints:
            prompt_tokens = [self._encode_prompt(problems[i].prompt + self.recipe.hint_template.format(hint=h))
                             for i, h in zip(which, hints)]
        else:
            prompt_tokens = [prompts[i] for i in which]
        gen = self.engine.generate(prompt_tokens, group_size=n, max_new_tokens=self.max_new_tokens,
                                   eos_token_id=self.eos_id, pad_token_id=self.pad_id, temperature=self.cfg.temperature,
                                   top_p=self.cfg.top_p, generator=self.generator)
        texts = self.tokenizer.batch_decode(gen.completion_ids, skip_special_tokens=True)
        row_problem = [problems[i] for i in which for _ in range(n)]
        rewards, correct, errors = self._score(row_problem, texts,
                                               gen.truncated if self.recipe.zero_truncated else None)
        if self.recipe.overlong_buffer_frac:
            lengths = gen.completion_mask.sum(1)
            buffer = math.ceil(self.recipe.overlong_buffer_frac * self.max_new_tokens)
            rewards = rewards + overlong_reward_penalty(lengths, self.max_new_tokens, buffer).to(rewards.dtype)
        prompt_index = torch.tensor([first_index + i for i in which for _ in range(n)], device=self.device)
        rows = len(texts)
        return _without_skipped(RolloutBatch(
            prompt_ids=gen.prompt_ids, prompt_mask=gen.prompt_mask, completion_ids=gen.completion_ids,
            completion_mask=gen.completion_mask, sampling_logp=gen.sampling_logp, rewards=rewards,
            correct=correct, group_ids=prompt_index.clone(), prompt_index=prompt_index,
            off_policy=torch.zeros(rows, dtype=torch.bool, device=self.device), truncated=gen.truncated,
            answer_ids=torch.zeros(rows, dtype=torch.long, device=self.device),
            hinted=torch.full((rows,), bool(hints), device=self.device), texts=texts,
            prompts=[p.prompt for p in row_problem], reward_errors=errors))

    def _hint_failed_groups(self, problems, prompts, batch: RolloutBatch, n: int, first_index: int) -> RolloutBatch:
        """GHPO (arXiv 2507.10628): re-roll groups where every rollout failed, with a growing
        prefix of the expert solution given as a hint in the user message, until some rollout succeeds."""
        schedule = self.recipe.hint_fractions
        for level in range(1, len(schedule) + 1):
            fraction = ghpo_hint_fraction(level, schedule)
            failed = ghpo_needs_hint(batch.correct.float(), batch.prompt_index)
            failed_prompts = sorted(set((batch.prompt_index[failed] - first_index).tolist()))
            failed_prompts = [i for i in failed_prompts if problems[i].demonstration]
            if not failed_prompts:
                break
            hints = [_hint(problems[i].demonstration, fraction) for i in failed_prompts]
            rerolled = self._sample(problems, prompts, failed_prompts, n, first_index, hints)
            keep = ~torch.isin(batch.prompt_index, rerolled.prompt_index)
            batch = RolloutBatch.concat([batch.rows(keep), rerolled])
        return batch

    def _expert_rows(self, problems, prompts, n: int, first_index: int) -> RolloutBatch:
        demos = [p.demonstration or p.answer for p in problems]
        completion = [self._encode_completion(d) for d in demos for _ in range(n)]
        prompt_rows = [prompts[i] for i in range(len(problems)) for _ in range(n)]
        prompt_ids, prompt_mask = pad_sequences(prompt_rows, self.pad_id, left=True, device=self.device)
        completion_ids, completion_mask = pad_sequences(completion, self.pad_id, left=False, device=self.device)
        texts = [d for d in demos for _ in range(n)]
        rewards, correct, errors = self._score([p for p in problems for _ in range(n)], texts)
        prompt_index = torch.tensor([first_index + i for i in range(len(problems)) for _ in range(n)],
                                    device=self.device)
        # Expert rows outside the group get a private (negative) group: advantage 0, no
        # influence on the rollouts' baseline.
        group_ids = prompt_index.clone() if self.recipe.expert_in_group else -(prompt_index + 1)
        rows = len(texts)
        return _without_skipped(RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
            completion_mask=completion_mask, sampling_logp=torch.zeros(completion_ids.shape, device=self.device),
            rewards=rewards, correct=correct, group_ids=group_ids, prompt_index=prompt_index,
            off_policy=torch.ones(rows, dtype=torch.bool, device=self.device),
            truncated=torch.zeros(rows, dtype=torch.bool, device=self.device),
            answer_ids=torch.zeros(rows, dtype=torch.long, device=self.device),
            hinted=torch.zeros(rows, dtype=torch.bool, device=self.device), texts=texts,
            prompts=[p.prompt for p in problems for _ in range(n)], reward_errors=errors))

    # -- pair sources ---------------------------------------------------------------------
    def _offline_pairs(self, seed: int, step: int, want_all: int) -> tuple[RolloutBatch, dict[str, float]]:
        """A seeded sample of `want_all` offline pairs (this rank's share: pairs rank, rank + N, ...)."""
        from unipo.pairs import encode_answer, encode_prompt, load_pairs

        if self._pairs is None:
            if not self.pairs_source:
                raise ValueError(f"recipe {self.recipe.name} trains on preference pairs: give them with --data FILE "
                                 f"(pairs=FILE)")
            self._pairs = load_pairs(self.pairs_source)
        data = self._pairs
        rng = random.Random(_mix_seed(seed, step, 0))
        n = len(data)
        drawn = rng.sample(range(n), want_all) if n >= want_all else [rng.randrange(n) for _ in range(want_all)]
        picked = [data[i] for i in drawn[self.rank::self.world_size]]
        stats = {"rollout/generation_rounds": 0.0, "rollout/groups_kept": float(len(picked)),
                 "rollout/reward_timeouts": 0.0, "rollout/pairs": float(len(picked)), "rollout/tied_prompts": 0.0}
        if not picked:
            return self._empty(), stats
        prompts, answers, texts, prompt_texts = [], [], [], []
        for j, pair in enumerate(picked):
            where = f"{self.pairs_source} pair {drawn[self.rank + j * self.world_size]}"
            ids = encode_prompt(self.tokenizer, pair.prompt, where=where)
            for answer in (pair.chosen, pair.rejected):
                prompts.append(ids)
                answers.append(encode_answer(self.tokenizer, pair.prompt, answer, where=where))
                texts.append(_plain(answer))
                prompt_texts.append(_plain(pair.prompt))
        prompt_ids, prompt_mask = pad_sequences(prompts, self.pad_id, left=True, device=self.device)
        completion_ids, completion_mask = pad_sequences(answers, self.pad_id, left=False, device=self.device)
        rows = len(answers)
        pair_index = torch.arange(len(picked), device=self.device).repeat_interleave(2)
        zeros = torch.zeros(rows, dtype=torch.bool, device=self.device)
        batch = RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
            completion_mask=completion_mask, sampling_logp=torch.zeros(completion_ids.shape, device=self.device),
            rewards=torch.tensor([1.0, 0.0] * len(picked), device=self.device), correct=zeros.clone(),
            group_ids=pair_index, prompt_index=pair_index.clone(), off_policy=~zeros, truncated=zeros.clone(),
            answer_ids=torch.zeros(rows, dtype=torch.long, device=self.device), hinted=zeros.clone(), texts=texts,
            prompts=prompt_texts)
        return batch, stats

    def _fresh_pairs(self, problems: list[Problem], first_index: int) -> RolloutBatch:
        """Pairs made this step from the policy's own samples (online_pairs, self_play) or against the task's
        demonstration (spin); pair i of the kept ones is indexed `first_index + problem index`."""
        prompts = [self._encode_prompt(p.prompt) for p in problems]
        every = list(range(len(problems)))
        if self.recipe.data == "spin":
            rejected = self._sample(problems, prompts, every, 1, first_index)
            self._sampled += rejected.rewards.tolist()
            chosen = self._expert_rows(problems, prompts, 1, first_index)
            ones = torch.ones(len(problems), device=self.device)
            return _interleave(chosen, rejected, ones, torch.zeros_like(ones), chosen.prompt_index)
        from unipo.oracles import build_oracle, preference_matrix, win_rates

        if self._oracle is None:
            self._oracle = build_oracle(self.oracle_spec, self.task)
        g, r = self.cfg.group_size, self.recipe
        sampled = self._sample(problems, prompts, every, g, first_index)
        self._sampled += sampled.rewards.tolist()
        candidates = sampled  # row i*g + k: sample k of prompt i; with demonstrations, row n*g + i: prompt i's
        if r.pair_with_demonstration:
            candidates = RolloutBatch.concat([sampled, self._expert_rows(problems, prompts, 1, first_index)])
        best, worst, best_rate, worst_rate = [], [], [], []
        for i, problem in enumerate(problems):
            rows = list(range(i * g, (i + 1) * g)) + ([len(problems) * g + i] * r.pair_with_demonstration)
            rates = win_rates(preference_matrix(self._oracle, problem, [candidates.texts[j] for j in rows]))
            top, bottom = int(torch.argmax(rates)), int(torch.argmin(rates))
            if rates[top] == rates[bottom]:  # every sample ties: nothing to prefer
                self._tied += 1
                continue
            if rates[top] - rates[bottom] < r.pair_min_margin:  # a small-margin pair (DNO's filter)
                self._small_margin += 1
                continue
            best.append(rows[top])
            worst.append(rows[bottom])
            best_rate.append(float(rates[top]))
            worst_rate.append(float(rates[bottom]))
        if not best:
            return self._empty()
        chosen = candidates.rows(torch.tensor(best, device=self.device))
        rejected = candidates.rows(torch.tensor(worst, device=self.device))
        if self.recipe.data == "self_play":
            targets = (torch.tensor(best_rate, device=self.device), torch.tensor(worst_rate, device=self.device))
        else:
            targets = (torch.ones(len(best), device=self.device), torch.zeros(len(best), device=self.device))
        batch = _interleave(chosen, rejected, *targets, chosen.prompt_index)
        batch.reward_errors = sampled.reward_errors
        return batch

    def _against_mixture(self, problems: list[Problem], first_index: int) -> RolloutBatch:
        """Nash-MD's rows: `group_size` samples of the policy per prompt, sample k rewarded with the oracle's
        P(sample k > mixture sample k), each mixture sample drawn from pi^(1-beta) * pi_ref^beta token by token
        (`unipo.mixture`, unipo's own sampler whatever the engine). The mixture samples are judged, not trained on."""
        from unipo.mixture import generate_mixture
        from unipo.oracles import build_oracle

        if self.reference is None:
            raise ValueError(f"recipe {self.recipe.name} samples the mixture with the reference model: none was given")
        if self._oracle is None:
            self._oracle = build_oracle(self.oracle_spec, self.task)
        g = self.cfg.group_size
        prompts = [self._encode_prompt(p.prompt) for p in problems]
        own = self._sample(problems, prompts, list(range(len(problems))), g, first_index)
        self._sampled += own.rewards.tolist()
        mix = generate_mixture(self.model, self.reference, prompts, beta=self.recipe.mixture_coef, group_size=g,
                               max_new_tokens=self.max_new_tokens, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                               temperature=self.cfg.temperature, top_p=self.cfg.top_p, generator=self.generator)
        mix_texts = self.tokenizer.batch_decode(mix.completion_ids, skip_special_tokens=True)
        row_problems = [p for p in problems for _ in range(g)]
        own.rewards = self._oracle(row_problems, own.texts, mix_texts).to(own.rewards)
        self._mixture_texts = mix_texts  # (read by tests)
        return own

    def _score(self, problems: list[Problem], texts: list[str],
               zeroed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(rewards on the recipe's scale, correct = full marks, scorer errors) of `texts`; rows in `zeroed`
        score 0. Scorer timeouts (reward sandbox) add to `self._reward_timeouts`, reported by `collect`."""
        result = score_completions(self.task, problems, texts)
        self._reward_timeouts += result.timeouts
        errors = result.errors
        score = torch.tensor(result.rewards, dtype=torch.float32, device=self.device)
        if zeroed is not None:
            score = torch.where(zeroed, torch.zeros_like(score), score)
        rewards = 2.0 * score - 1.0 if self.recipe.reward_scale == "signed" else score
        if self.reward_functions is not None:  # + sum of weight * fn; NaN where one said None (the row is dropped)
            user = self.reward_functions.score(problems, texts)
            self._reward_timeouts += user.timeouts
            stats = self._user_stats
            for name, count in user.errors.items():
                stats[f"errors/{name}"] = stats.get(f"errors/{name}", 0.0) + count
                stats[f"sum/{name}"] = stats.get(f"sum/{name}", 0.0) + user.sums[name]
                stats[f"n/{name}"] = stats.get(f"n/{name}", 0.0) + user.counts[name]
            stats["skipped"] = stats.get("skipped", 0.0) + sum(user.skipped)  # (keys with a '/' are per function)
            extra = torch.tensor(user.total, dtype=rewards.dtype, device=self.device)
            skipped = torch.tensor(user.skipped, dtype=torch.bool, device=self.device)
            rewards = torch.where(skipped, torch.full_like(rewards, math.nan), rewards + extra)
        return rewards, score >= 1.0, errors

    def _user_metrics(self) -> dict[str, float]:
        """rollout/reward_errors/<name>, rollout/reward_fn/<name> (mean value) and rollout/reward_skipped."""
        if self.reward_functions is None:
            return {}
        stats, out = self._user_stats, {"rollout/reward_skipped": self._user_stats.get("skipped", 0.0)}
        for name in self.reward_functions.names:
            out[f"rollout/reward_errors/{name}"] = stats.get(f"errors/{name}", 0.0)
            if stats.get(f"n/{name}"):
                out[f"rollout/reward_fn/{name}"] = stats[f"sum/{name}"] / stats[f"n/{name}"]
        return out

    def _separate_expert_rows(self, n_rollouts: int, seed: int, step: int, first_index: int) -> RolloutBatch:
        """Demonstrations of other training prompts, `expert_batch_frac` of the step's rows (CHORD mixes its
        SFT set into every batch at a ratio): each its own prompt, outside every advantage group."""
        frac = self.recipe.expert_batch_frac
        n = max(1, round(frac / (1.0 - frac) * n_rollouts))
        problems = self.task.sample(n, seed=_mix_seed(seed, step, 10_007 + 7_919 * self.rank), split="train")
        rows = self._expert_rows(problems, [self._encode_prompt(p.prompt) for p in problems], 1, first_index)
        rows.group_ids = -(rows.prompt_index + 1)
        return rows

    def _empty(self) -> RolloutBatch:
        z = torch.zeros((0, 1), dtype=torch.long, device=self.device)
        e = torch.zeros(0, device=self.device)
        return RolloutBatch(z, z, z, z, z.float(), e, e.bool(), e.long(), e.long(), e.bool(), e.bool(),
                            e.long(), e.bool(), [], [])


def _interleave(chosen: RolloutBatch, rejected: RolloutBatch, chosen_target: torch.Tensor,
                rejected_target: torch.Tensor, pair_index: torch.Tensor) -> RolloutBatch:
    """Rows (chosen_j, rejected_j) for each j, with `group_ids` = `prompt_index` = pair_index[j] and the
    preference targets as rewards."""
    n = len(chosen)
    order = torch.stack([torch.arange(n), torch.arange(n) + n], 1).reshape(-1)
    batch = RolloutBatch.concat([chosen, rejected]).rows(order)
    index = pair_index.repeat_interleave(2)
    batch.group_ids, batch.prompt_index = index, index.clone()
    batch.rewards = torch.stack([chosen_target, rejected_target], 1).reshape(-1).to(batch.rewards)
    return batch


def _plain(text) -> str:
    """A pair's text as one string (a message list: its contents, one per line)."""
    return text if isinstance(text, str) else "\n".join(m.content for m in text)


def _without_skipped(batch: RolloutBatch) -> RolloutBatch:
    """The batch without the rows a user reward function skipped (None: NaN reward, set by `_score`)."""
    skipped = batch.rewards.isnan()
    return batch.rows(~skipped) if bool(skipped.any()) else batch


def _hint(demonstration: str, fraction: float) -> str:
    """The first `fraction` of the solution's characters, rounded as GHPO's code does (Python's round)."""
    return demonstration[: round(fraction * len(demonstration))]


def _mix_seed(seed: int, step: int, attempt: int) -> int:
    """A distinct, reproducible task-sampling seed per (run seed, step, attempt)."""
    return (seed * 1_000_003 + step) * 97 + attempt
