"""Multi-turn episodes: rollouts of whole episodes against an environment, as rows of one `RolloutBatch`.

The layout: an episode of T turns is T rows. Row t's prompt is the conversation so far, rendered as text and
encoded afresh (the environment's first observation, then each earlier action and the observation that answered
it); its completion is the model's action at turn t, exactly the tokens it sampled, with their sampling
log-probs. Environment and tool text is therefore only ever prompt: it gets no loss and no gradient by
construction, the mask is exact without any change to the forward, the loss or the aggregation, and every
single-turn slot (losses, selections, mixers, KL, the behaviour pass) runs on episodes unchanged. The cost is
that each turn re-encodes its prefix (a prefill of the whole conversation per turn instead of one long sequence
with an observation mask): fine for short episodes, quadratic in the number of turns for long ones.
(With a subword tokenizer, re-encoding an earlier action's text may split it differently from the tokens that
were sampled; it is context only, and the trained completion is always the sampled tokens themselves.)

Rendering (`render`): through the tokenizer's chat template when it has one (observations as user turns,
actions as assistant turns, generation prompt added); otherwise (the embedded tiny model) the built-in format

    <first observation>\n> <action 0>\n<observation 1>\n> <action 1>\n ... \n>

and the model's action follows the last `> `.

Rollouts are batched across episodes: at each turn, every live episode's prompt goes into one `engine.generate`
call (one sample each); a problem's G episodes (`rollout.group_size`) form its advantage group. An episode ends
when the environment says done, after `max_turns` actions, or when its token budget (`max_episode_tokens`, the
model's own tokens) is spent (an action cut by the budget counts as truncated).

Rows carry `episode_ids`, `turn_index`, `turn_rewards`, `episode_rewards` and `info_gain` (IGPO's, computed only
when a slot declares it: `information_gain`) (`unipo.core.turns` reads them);
`rewards` and `correct` of each row are its episode's outcome and success. Metrics: `env/turns_mean`,
`env/success` (over the step's own episodes), `env/tool_errors` (failed tool calls, summed), `env/episodes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from unipo.core.turns import EPISODE_INPUTS  # (importing it registers the multi-turn credit estimators)
from unipo.envs.base import Environment, get_env
from unipo.rollout import pad_sequences
from unipo.tasks.base import Problem


@dataclass
class Turn:
    prompt_ids: list[int]
    completion_ids: list[int]  # the model's own tokens (EOS included when it ended the action)
    logp: list[float]  # their sampling log-probs (zeros for an expert's action)
    action: str
    observation: str  # the environment's answer to the action
    reward: float
    truncated: bool
    info_gain: float = 0.0  # IGPO's: p(gold | after this turn) - p(gold | before it); 0 unless asked for
    observation_role: str = "user"  # "tool" when the observation is a tool's result (info["observation_role"])


@dataclass
class Episode:
    problem: Problem
    group: int  # the problem's index in the step (the advantage group)
    first_observation: str
    turns: list[Turn] = field(default_factory=list)
    outcome: float = 0.0
    success: bool = False
    tool_errors: int = 0
    expert: bool = False
    tools: tuple[str, ...] = ()  # the tools the environment offers (`Environment.tools`), shown by a chat template


def render(tokenizer, first_observation: str, actions: list[str], observations: list[str], *,
           roles: list[str] | None = None, tools: tuple[str, ...] = ()) -> str:
    """The conversation before the next action (see the module docstring). With a chat template, observation i is a
    message of role `roles[i]` ("user", or "tool" for a tool's result: templates such as Qwen2.5's wrap it in
    their tool-response markup), and the template is given the JSON schemas of `tools` (its `tools=` argument:
    the templates that support tools describe them and their call format to the model)."""
    if getattr(tokenizer, "chat_template", None):
        roles = roles or ["user"] * len(observations)
        messages = [{"role": "user", "content": first_observation}]
        for action, observation, role in zip(actions, observations, roles):
            messages += [{"role": "assistant", "content": action}, {"role": role, "content": observation}]
        schemas = tool_schemas(tools) if tools else None
        return tokenizer.apply_chat_template(messages, tools=schemas, tokenize=False, add_generation_prompt=True)
    text = first_observation
    for action, observation in zip(actions, observations):
        text += f"\n> {action}\n{observation}"
    return text + "\n> "


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def run_episodes(engine, tokenizer, env_cls: type[Environment], problems: list[Problem], group_size: int, *,
                 max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, greedy: bool = False) -> list[Episode]:
    """`group_size` episodes of each problem (episode i * group_size + k: problem i), the model acting."""
    envs, episodes = [], []
    for i, problem in enumerate(problems):
        for _ in range(group_size):
            env = env_cls()
            episodes.append(Episode(problem, i, env.reset(problem), tools=env_cls.tools))
            envs.append(env)
    return play_episodes(engine, tokenizer, env_cls, episodes, envs, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, generator=generator, greedy=greedy)


def play_episodes(engine, tokenizer, env_cls: type[Environment], episodes: list[Episode], envs: list[Environment],
                  *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, greedy: bool = False) -> list[Episode]:
    """Play every episode on to its end (each still live: not done, under `max_turns` and its token budget),
    `envs[i]` being episode i's environment after its turns so far (none yet, or a replayed prefix: `unipo.trees`);
    then set each outcome and success."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    used = [sum(len(turn.completion_ids) for turn in episode.turns) for episode in episodes]
    live = list(range(len(episodes)))
    while live:
        prompts = [_encode(tokenizer, _conversation(tokenizer, episodes[i])) for i in live]
        room = [env_cls.max_episode_tokens - used[i] for i in live]
        gen = engine.generate(prompts, group_size=1, max_new_tokens=min(max_new_tokens, max(room)), eos_token_id=eos,
                              pad_token_id=pad, temperature=temperature, top_p=top_p, generator=generator,
                              greedy=greedy)
        still = []
        for row, i in enumerate(live):
            n = int(gen.completion_mask[row].sum())
            cut = n > room[row]
            n = min(n, room[row])
            ids = gen.completion_ids[row, :n].tolist()
            action = tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True)
            observation, reward, done, info = envs[i].step(action)
            episode = episodes[i]
            episode.turns.append(Turn(prompts[row], ids, gen.sampling_logp[row, :n].float().tolist(), action,
                                      observation, float(reward), bool(gen.truncated[row]) or cut,
                                      observation_role=info.get("observation_role", "user")))
            episode.tool_errors += int(info.get("tool_errors", 0))
            used[i] += n
            if not (done or len(episode.turns) >= env_cls.max_turns or used[i] >= env_cls.max_episode_tokens):
                still.append(i)
        live = still
    for env, episode in zip(envs, episodes):
        episode.outcome, episode.success = float(env.outcome()), bool(env.success())
    return episodes


def expert_episodes(tokenizer, env_cls: type[Environment], problems: list[Problem], n: int) -> list[Episode]:
    """n replays of each problem's demonstration (`env_cls.demonstrate`), as episodes of off-policy turns."""
    replays = [(i, problem, env_cls.demonstrate(problem)) for i, problem in enumerate(problems) for _ in range(n)]
    return replay_episodes(tokenizer, env_cls, replays, expert=True)


def replay_episodes(tokenizer, env_cls: type[Environment], replays: list[tuple[int, Problem, list[str]]], *,
                    expert: bool) -> list[Episode]:
    """Each (group, problem, actions) played in a fresh environment, action by action until it says done: episodes
    whose turns are those actions' tokens (EOS-terminated; sampling log-probs 0, unknown) and the environment's
    observations and rewards. Demonstrations (`expert=True`: off-policy rows) and recorded episodes
    (`unipo.episode_files`)."""
    eos = tokenizer.eos_token_id
    episodes = []
    for group, problem, actions in replays:
        env = env_cls()
        episode = Episode(problem, group, env.reset(problem), expert=expert, tools=env_cls.tools)
        for action in actions:
            prompt = _encode(tokenizer, _conversation(tokenizer, episode))
            observation, reward, done, info = env.step(action)
            ids = _encode(tokenizer, action) + [eos]
            episode.turns.append(Turn(prompt, ids, [0.0] * len(ids), action, observation, float(reward), False,
                                      observation_role=info.get("observation_role", "user")))
            episode.tool_errors += int(info.get("tool_errors", 0))
            if done:
                break
        episode.outcome, episode.success = float(env.outcome()), bool(env.success())
        episodes.append(episode)
    return episodes


def _conversation(tokenizer, episode: Episode) -> str:
    return render(tokenizer, episode.first_observation, [t.action for t in episode.turns],
                  [t.observation for t in episode.turns], roles=[t.observation_role for t in episode.turns],
                  tools=episode.tools)


def tool_schemas(names: tuple[str, ...]) -> list[dict]:
    """The JSON schemas of registered tools (transformers' `get_json_schema`: from the signature's types and the
    docstring's description and Args section), as chat templates take them."""
    from transformers.utils import get_json_schema

    from unipo.envs.tools import TOOLS

    return [get_json_schema(TOOLS.get(name)) for name in names]


@torch.no_grad()
def information_gain(model, tokenizer, episodes: list[Episode], device: torch.device) -> None:
    """Set each turn's `info_gain` (IGPO, arXiv 2510.14967, sec. 3.2): with p_k = exp(mean log pi(gold answer
    tokens | the conversation after k turns)), the gold answer being the problem's `answer` as the model's next
    action, turn t (not an episode's last) gets p_(t+1) - p_t. Turn k's prompt is the conversation after k turns,
    so one no-grad forward over every turn's prompt + the answer gives every p."""
    from unipo.rollout import policy_logprobs

    turns = [(episode, t) for episode in episodes for t in range(len(episode.turns))]
    if not turns:
        return
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = [_encode(tokenizer, episode.problem.answer) for episode, _ in turns]
    prompt_ids, prompt_mask = pad_sequences([e.turns[t].prompt_ids for e, t in turns], pad, left=True, device=device)
    answer_ids, answer_mask = pad_sequences(answers, pad, left=False, device=device)
    logp = policy_logprobs(model, prompt_ids, prompt_mask, answer_ids, answer_mask).logp.float()
    mask = answer_mask.float()
    p = torch.exp((logp * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    for i, (episode, t) in enumerate(turns):
        if t + 1 < len(episode.turns):
            episode.turns[t].info_gain = p[i + 1] - p[i]


def episodes_to_batch(episodes: list[Episode], tokenizer, device: torch.device, *, first_index: int = 0,
                      signed: bool = False, expert_in_group: bool = False):
    """One row per turn (see the module docstring). Expert episodes are off-policy rows, in their problem's group
    with `expert_in_group`, else in a private (negative) group as the single-turn collector's expert rows."""
    from unipo.collect import RolloutBatch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = [(e, episode, t, turn) for e, episode in enumerate(episodes) for t, turn in enumerate(episode.turns)]
    prompt_ids, prompt_mask = pad_sequences([turn.prompt_ids for *_, turn in rows], pad, left=True, device=device)
    completion_ids, completion_mask = pad_sequences([turn.completion_ids for *_, turn in rows], pad, left=False,
                                                    device=device)
    logp = torch.zeros(completion_ids.shape, device=device)
    for r, (*_, turn) in enumerate(rows):
        logp[r, :len(turn.logp)] = torch.tensor(turn.logp, device=device)

    def column(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype, device=device)

    outcome = column([episode.outcome for _, episode, *_ in rows])
    off_policy = column([episode.expert for _, episode, *_ in rows], torch.bool)
    prompt_index = column([first_index + episode.group for _, episode, *_ in rows], torch.long)
    private = off_policy & (not expert_in_group)
    episode_rewards = 2.0 * outcome - 1.0 if signed else outcome
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, sampling_logp=logp, rewards=episode_rewards.clone(),
        correct=column([episode.success for _, episode, *_ in rows], torch.bool),
        group_ids=torch.where(private, -(prompt_index + 1), prompt_index), prompt_index=prompt_index,
        off_policy=off_policy, truncated=column([turn.truncated for *_, turn in rows], torch.bool),
        answer_ids=torch.zeros(len(rows), dtype=torch.long, device=device),
        hinted=torch.zeros(len(rows), dtype=torch.bool, device=device),
        texts=[turn.action for *_, turn in rows], prompts=[episode.problem.prompt for _, episode, *_ in rows],
        episode_ids=column([e for e, *_ in rows], torch.long),
        turn_index=column([t for _, _, t, _ in rows], torch.long),
        turn_rewards=column([turn.reward for *_, turn in rows]), episode_rewards=episode_rewards,
        info_gain=column([turn.info_gain for *_, turn in rows]),
        references=[episode.problem.answer for _, episode, *_ in rows])


def episode_stats(episodes: list[Episode]) -> dict[str, float]:
    """env/turns_mean, env/success (over the model's own episodes), env/tool_errors (all), env/episodes."""
    own = [e for e in episodes if not e.expert] or episodes
    return {"env/turns_mean": sum(len(e.turns) for e in own) / max(1, len(own)),
            "env/success": sum(e.success for e in own) / max(1, len(own)),
            "env/tool_errors": float(sum(e.tool_errors for e in episodes)), "env/episodes": float(len(own))}


def collect_episodes(collector, *, seed: int, step: int):
    """The collector's step for `recipe.data = episodes` (`RolloutCollector.collect` dispatches here): this rank's
    share of `prompts_per_step` problems of `collector.env`, `group_size` episodes each (less `expert_per_group`
    replayed demonstrations unless `expert_in_addition`).

    `recipe.dynamic_sampling` (DAPO's filter, on episodes): a problem whose own episodes all succeed or all fail is
    dropped, and more problems are drawn (`rollout.max_resample_tries` extra rounds at most) until the step has its
    share of problems with mixed success. `recipe.zero_truncated`: an episode with an action cut off (at the action
    or the episode token budget) has outcome 0, whatever the environment says (its turn rewards and success stay
    the environment's, as `correct` stays the verifier's on single-turn rows). The env/ metrics are over every
    episode played this step, kept or not."""
    from unipo.collect import _mix_seed
    from unipo.slots import recipe_inputs

    env_cls = get_env(collector.env or "guess_number")
    r, cfg = collector.recipe, collector.cfg
    want_all = math.ceil(r.prompt_multiplier * cfg.prompts_per_step)
    want = len(range(collector.rank, want_all, collector.world_size))
    n_expert = r.expert_per_group
    n_policy = cfg.group_size if (r.expert_in_addition or not n_expert) else cfg.group_size - n_expert
    played: list[Episode] = []
    policy: list[Episode] = []
    expert: list[Episode] = []
    kept = tries = 0
    while True:
        draw = env_cls.sample(want_all, seed=_mix_seed(seed, step, tries), split="train")
        problems = draw[collector.rank::collector.world_size]
        tries += 1
        episodes = run_episodes(collector.engine, collector.tokenizer, env_cls, problems, n_policy,
                                max_new_tokens=cfg.max_new_tokens or env_cls.max_action_tokens,
                                temperature=cfg.temperature, top_p=cfg.top_p, generator=collector.generator)
        if n_expert:
            episodes += expert_episodes(collector.tokenizer, env_cls, problems, n_expert)
        played += episodes
        for group in [[e for e in episodes if e.group == i] for i in range(len(problems))]:  # (before renumbering)
            if kept >= want or (r.dynamic_sampling and len({e.success for e in group if not e.expert}) < 2):
                continue  # enough problems, or one whose episodes all agree (no signal for a group baseline)
            for episode in group:
                episode.group = kept
                (expert if episode.expert else policy).append(episode)
            kept += 1
        if not r.dynamic_sampling or kept >= want or tries > cfg.max_resample_tries:
            break
    episodes = policy + expert
    if r.zero_truncated:
        for episode in episodes:
            if any(turn.truncated for turn in episode.turns):
                episode.outcome = 0.0
    if "info_gain" in recipe_inputs(r):  # IGPO's turn rewards: one more no-grad forward per turn
        information_gain(collector.model, collector.tokenizer, episodes, collector.device)
    stats = {"rollout/generation_rounds": float(tries), "rollout/groups_kept": float(kept),
             "rollout/reward_timeouts": 0.0, **episode_stats(played)}
    if not episodes:
        return collector._empty(), stats
    batch = episodes_to_batch(episodes, collector.tokenizer, collector.device, signed=r.reward_scale == "signed",
                              expert_in_group=r.expert_in_group)
    return batch, stats


def episode_input(batch, name: str) -> torch.Tensor:
    """The batch input `name` (one of `unipo.core.turns.EPISODE_INPUTS`); a single-turn batch's rows are one-turn
    episodes: episode id = row, turn 0, turn reward = episode reward = the row's reward, information gain 0."""
    if name not in EPISODE_INPUTS:
        raise ValueError(f"{name!r} is not an episode input ({', '.join(EPISODE_INPUTS)})")
    value = getattr(batch, name, None)
    if value is not None:
        return value
    rows = len(batch)
    device = batch.rewards.device
    if name == "episode_ids":
        return torch.arange(rows, device=device)
    if name == "turn_index":
        return torch.zeros(rows, dtype=torch.long, device=device)
    if name == "info_gain":
        return torch.zeros_like(batch.rewards)
    return batch.rewards


def evaluate_episodes(trainer, n: int, *, transcripts: int = 4) -> dict[str, float]:
    """Held-out episodes (test split, one greedy episode per problem) of the trainer's environment: success as
    `accuracy`, the env/ metrics, and the first `transcripts` episodes appended to the run folder's
    transcripts.jsonl (step, prompt, secret answer, each turn's action, observation and reward, outcome)."""
    from unipo.engine.native import NativeEngine

    env_cls = get_env(trainer.config.env or "guess_number")
    problems = env_cls.sample(n, seed=trainer.config.seed, split="test")
    with trainer.autocast(), torch.no_grad():
        was_training = trainer.model.training
        trainer.model.eval()
        episodes = run_episodes(NativeEngine(trainer.model), trainer.tokenizer, env_cls, problems, 1,
                                max_new_tokens=trainer.config.rollout.max_new_tokens or env_cls.max_action_tokens,
                                temperature=trainer.config.rollout.temperature, greedy=True)
        trainer.model.train(was_training)
    stats = episode_stats(episodes)
    lengths = [len(t.completion_ids) for e in episodes for t in e.turns]
    result = {"accuracy": stats["env/success"], **stats, "response_len_mean": sum(lengths) / max(1, len(lengths))}
    if trainer.run is not None:
        for episode in episodes[:transcripts]:
            trainer.run.append("transcripts.jsonl", transcript(episode, trainer.step))
    return result


def transcript(episode: Episode, step: int) -> dict:
    return {"step": step, "prompt": episode.first_observation, "answer": episode.problem.answer,
            "turns": [{"action": t.action, "observation": t.observation, "reward": t.reward} for t in episode.turns],
            "outcome": episode.outcome, "success": episode.success, "tool_errors": episode.tool_errors}
