"""A scripted rollout engine for the multi-turn tests: its action for a prompt is `policy(prompt text)`."""

from __future__ import annotations

import torch

from unipo.rollout import Generation, pad_sequences

SAMPLED_LOGP = -0.25  # the sampling log-prob it reports for every token


class ScriptedEngine:
    """An engine whose action for a prompt is `policy(prompt text)`, with log-prob SAMPLED_LOGP per token; `calls`
    records how many prompts each `generate` call got."""

    logp_exact = True

    def __init__(self, tokenizer, policy) -> None:
        self.tokenizer, self.policy, self.calls = tokenizer, policy, []

    def generate(self, prompts, *, group_size, max_new_tokens, eos_token_id, pad_token_id, **_):
        self.calls.append(len(prompts))
        prompts = [p for p in prompts for _ in range(group_size)]  # row i * group_size + j: prompt i's j-th sample
        actions = [self.tokenizer(self.policy(self.tokenizer.decode(p)), add_special_tokens=False)["input_ids"]
                   [:max_new_tokens] for p in prompts]
        completions = [a + [eos_token_id] if len(a) < max_new_tokens else a for a in actions]
        prompt_ids, prompt_mask = pad_sequences(prompts, pad_token_id, left=True)
        ids, mask = pad_sequences(completions, pad_token_id, left=False)
        return Generation(prompt_ids, prompt_mask, ids, mask, SAMPLED_LOGP * mask.float(),
                          torch.tensor([len(a) >= max_new_tokens for a in actions]))
