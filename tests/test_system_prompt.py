"""`system_prompt`: a system message before every prompt, through the chat template or as plain text."""

from __future__ import annotations

import pickle

import pytest

from unipo.config import TrainConfig
from unipo.models import build_char_tokenizer, format_prompt
from unipo.recipes import get_recipe
from unipo.tasks.base import SystemPrompted, get_task
from unipo.trainer import Trainer

SYSTEM = "You sort numbers."
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_the_prompt_gets_a_system_turn_or_a_system_line():
    task = SystemPrompted(get_task("sort"), SYSTEM)
    plain = get_task("sort").sample(2, seed=0)
    problems = task.sample(2, seed=0)
    assert [p.answer for p in problems] == [p.answer for p in plain]  # same problems, same verifier
    tokenizer = build_char_tokenizer()
    assert format_prompt(tokenizer, problems[0].prompt) == f"{SYSTEM}\n\n{plain[0].prompt}"  # no chat template
    tokenizer.chat_template = TEMPLATE
    assert format_prompt(tokenizer, problems[0].prompt) == (f"<|system|>{SYSTEM}\n<|user|>{plain[0].prompt}\n"
                                                            f"<|assistant|>")
    assert task.score(problems[0], plain[0].answer) == 1.0
    assert pickle.loads(pickle.dumps(task)).sample(1, seed=0)[0].prompt == problems[0].prompt  # sandbox workers


def test_the_trainer_samples_with_the_system_prompt_and_the_config_checks_it():
    trainer = Trainer(TrainConfig(recipe=get_recipe("grpo"), task="sort", steps=1, system_prompt=SYSTEM),
                      progress=False)
    assert all(p.prompt.startswith(SYSTEM) for p in trainer.task.sample(3, seed=0))
    with pytest.raises(ValueError, match="system_prompt"):
        TrainConfig(recipe=get_recipe("grpo"), system_prompt="  ")
