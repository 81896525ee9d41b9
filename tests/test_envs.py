"""Environments and tools (unipo.envs): the built-in games, strict tool-call parsing, and every tool failure giving
its documented observation and count while the episode goes on."""

from __future__ import annotations

import pytest

from tests.agent_tools import TOOLS as TEST_TOOLS
from unipo.envs import ENVIRONMENTS, get_env
from unipo.envs.games import Calculator, GuessNumber
from unipo.envs.tools import ToolCallError, ToolRunner, calc, parse_call


def replay(env_cls, problem, actions):
    env = env_cls()
    env.reset(problem)
    steps = [env.step(a) for a in actions]
    return env, steps


@pytest.mark.parametrize("name", ["guess_number", "calculator"])
def test_every_demonstration_solves_its_problem_within_the_turn_limit(name):
    env_cls = get_env(name)
    assert name in ENVIRONMENTS
    for problem in env_cls.sample(12, seed=3, split="train") + env_cls.sample(4, seed=3, split="test"):
        actions = env_cls.demonstrate(problem)
        env, steps = replay(env_cls, problem, actions)
        assert len(actions) <= env_cls.max_turns and steps[-1][2], (problem, steps)
        # each action and the episode fit the budgets in the tiny model's tokens (one per character, + EOS)
        assert max(len(a) + 1 for a in actions) <= env_cls.max_action_tokens
        assert sum(len(a) + 1 for a in actions) <= env_cls.max_episode_tokens
        assert env.success() and env.outcome() == 1.0


def test_guess_number_feedback_and_turn_rewards():
    problem = GuessNumber.sample(1, seed=0)[0]
    problem = type(problem)(prompt=problem.prompt, answer="5", demonstration=None, meta={"target": 5})
    env, steps = replay(GuessNumber, problem, ["8", "no idea", "9", "3", "5"])
    assert [s[0] for s in steps] == ["lower", "say a number", "lower", "higher", "correct"]
    # informative = inside the interval still possible: 9 is not (8 already said lower)
    assert [s[1] for s in steps] == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert [s[2] for s in steps] == [False] * 4 + [True]
    assert GuessNumber.demonstrate(problem) == ["8", "4", "6", "5"]


def test_calculator_must_go_through_the_tool():
    problem = Calculator.sample(1, seed=1)[0]
    a, b = problem.meta["expression"].split("*")
    # the short positional call: what the tiny model learns to copy the factors into (docs/agents.md)
    assert problem.prompt == f"What is {a}*{b}? Use calc." and problem.answer == str(int(a) * int(b))
    assert Calculator.demonstrate(problem) == [f'<tool>calc("{a}*{b}")</tool>', problem.answer]
    env, steps = replay(Calculator, problem, [problem.answer])  # the right number, but no tool call
    assert steps[0][2] and not env.success()
    # a call that ran, but the answer is not its value: the model's own arithmetic does not count
    env, steps = replay(Calculator, problem, ['<tool>calc("2+3")</tool>', problem.answer])
    assert steps[0][:3] == ("= 5", 1.0, False) and steps[1][:3] == ("wrong", 0.0, True) and not env.success()
    env, steps = replay(Calculator, problem, Calculator.demonstrate(problem))
    assert steps[0][:3] == (f"= {problem.answer}", 1.0, False) and steps[1][:3] == ("correct", 1.0, True)
    assert env.success()
    # the keyword form is parsed as well; a failed call, then a good one, then the answer (3 turns)
    env, steps = replay(Calculator, problem, ["<tool>calc(expression=1+)</tool>",
                                              f'<tool>calc(expression="{b}*{a}")</tool>', f"it is {problem.answer}"])
    assert [s[1] for s in steps] == [0.0, 1.0, 1.0] and env.success()


def scale(x: float, by: int, *, offset: float = 0.0) -> float:  # a tool with a keyword-only parameter (parsing only)
    return x * by + offset


def test_tool_calls_are_parsed_strictly_never_evaluated():
    tools = {"calc": calc, "scale": scale}
    assert parse_call('<tool>calc(expression="2+3")</tool>', tools).args == {"expression": "2+3"}
    assert parse_call('<tool>calc("2+3")</tool>', tools).args == {"expression": "2+3"}  # positional, in order
    assert parse_call("<tool>scale(1.5, by=2, offset=-1)</tool>", tools).args == {"x": 1.5, "by": 2, "offset": -1}
    assert parse_call('x <tool_call>{"name": "calc", "arguments": {"expression": "1"}}</tool_call>', tools).name == \
        "calc"
    for text, kind, why in [
            ('<tool>calc(expression=__import__("os").getcwd())</tool>', "malformed", "expression is not a literal"),
            ('<tool>calc(__import__("os").getcwd())</tool>', "malformed", "argument 1 is not a literal"),
            ("<tool>calc(37*24)</tool>", "malformed", "argument 1 is not a literal"),  # an expression, not a string
            ('<tool>calc(*["1"])</tool>', "malformed", "want name(value, ..., key=value, ...)"),
            ('<tool>calc(**{"expression": "1"})</tool>', "malformed", "want name(value, ..., key=value, ...)"),
            ('<tool>calc(expression="1", "2")</tool>', "malformed", "syntax error"),  # positional after key=value
            ("<tool>calc(expression=\"1\"</tool>", "malformed", "syntax error"),
            ("<tool>calc(" + "-" * 100_000 + "1)</tool>", "malformed", "syntax error"),  # too deep for the parser
            ("<tool_call>{name: calc}</tool_call>", "malformed", "not JSON"),
            ("no call here", "malformed", "no <tool>...</tool>"),
            ("<tool>calc(1)</tool>", "arguments", "expression must be str"),
            ('<tool>calc(expression=1)</tool>', "arguments", "expression must be str"),
            ('<tool>calc(expr="1")</tool>', "arguments", "unknown expr"),
            ('<tool>calc("1", "2")</tool>', "arguments", "at most 1 positional"),
            ('<tool>calc("1", expression="2")</tool>', "arguments", "expression given twice"),
            ("<tool>scale(1.0, 2, 3.0)</tool>", "arguments", "at most 2 positional"),  # offset is keyword-only
            ("<tool>scale(1.0)</tool>", "arguments", "missing by"),
            ('<tool>rm("/")</tool>', "unknown", "tools: calc, scale")]:
        with pytest.raises(ToolCallError) as caught:
            parse_call(text, tools)
        assert caught.value.kind == kind and f"({why})" in str(caught.value), (text, str(caught.value))
    assert calc("7*(2+3)-4//3") == 34
    with pytest.raises(ValueError):
        calc("2**99999")  # no powers: nothing unbounded


def test_each_tool_failure_gives_its_observation_and_count_and_the_episode_goes_on(tmp_path):
    target = tmp_path / "written.txt"
    runner = ToolRunner({**TEST_TOOLS, "calc": calc}, timeout_s=1.0)
    try:
        env = Calculator(runner=runner)
        problem = Calculator.sample(1, seed=2)[0]
        env.reset(problem)
        cases = [
            ("<tool>add(a=1, b=</tool>", "tool error: malformed call (syntax error)"),
            ("<tool>add(1, 1+1)</tool>", "tool error: malformed call (argument 2 is not a literal)"),
            ("<tool>mul(a=1, b=2)</tool>",
             "tool error: unknown tool mul (tools: add, boom, calc, describe, flood, huge, mute, scribble, sleepy, "
             "words)"),
            ('<tool>add(a="1", b=2)</tool>', "tool error: bad arguments for add (a must be int)"),
            ("<tool>add(1, 2, 3)</tool>", "tool error: bad arguments for add (at most 2 positional)"),
            ('<tool>calc("1/0")</tool>', "tool error: calc raised an exception"),
            ("<tool>boom(3)</tool>", "tool error: boom raised an exception"),
            ("<tool>words(n=3)</tool>", "tool error: words returned no number"),
            ("<tool>sleepy(seconds=30.0)</tool>", "tool error: sleepy timed out"),
            (f'<tool>scribble(path="{target}")</tool>', "tool error: scribble was stopped by the sandbox"),
        ]
        tool_role = {"observation_role": "tool"}  # (a chat template renders a tool's result as a tool turn)
        for action, observation in cases:
            seen, reward, done, info = env.step(action)
            assert (seen, reward, done, info) == (observation, 0.0, False, {"tool_errors": 1, **tool_role}), action
        assert not target.exists()
        # the episode goes on: good calls (the answer must be the value of one), then the answer
        a, b = problem.meta["expression"].split("*")
        assert env.step(f"<tool>add({a}, b={b})</tool>") == (f"= {int(a) + int(b)}", 1.0, False,
                                                              {"tool_errors": 0, **tool_role})
        assert env.step(f'<tool>calc("{a}*{b}")</tool>') == (f"= {problem.answer}", 1.0, False,
                                                              {"tool_errors": 0, **tool_role})
        assert env.step(problem.answer)[:3] == ("correct", 1.0, True) and env.success()
    finally:
        runner.close()


def test_a_text_tool_returns_its_text_verbatim_cut_at_4096_bytes_and_in_process_scoring_agrees():
    """A `-> str` tool's value comes back through the sandbox's text channel as the text itself (newlines and
    non-ASCII kept, nothing escaped or evaluated), cut at MAX_RESULT_TEXT bytes of UTF-8; a `-> str` tool that
    returns a number is an error; number tools are unchanged. The sandbox's results equal in-process scoring's."""
    from unipo.envs.tools import ToolResult
    from unipo.tasks import Problem
    from unipo.tasks.base import MAX_RESULT_TEXT, score_in_process

    runner = ToolRunner({**TEST_TOOLS, "calc": calc}, timeout_s=2.0)
    try:
        assert runner("<tool>describe(3)</tool>") == ToolResult("line one: 3\nzwei: \u00fc \u2713")
        assert MAX_RESULT_TEXT == 4096
        assert runner("<tool>flood(2048)</tool>").observation == "\u00e9" * 2048  # exactly 4096 bytes
        assert runner("<tool>flood(5000)</tool>").observation == "\u00e9" * 2048  # cut at 4096 bytes
        assert runner('<tool>flood("x")</tool>').error == "arguments"
        assert runner("<tool>mute(1)</tool>") == ToolResult("tool error: mute returned no text", "raised")
        assert runner("<tool>huge(1)</tool>") == ToolResult("tool error: huge returned no number", "raised")
        assert runner("<tool>add(1, 2)</tool>") == ToolResult("= 3", None, 3.0)
        assert runner('<tool>calc("7/2")</tool>') == ToolResult("= 3.5", None, 3.5)
        calls = [("describe", {"n": 5}), ("flood", {"n": 3000}), ("mute", {"n": 1}), ("add", {"a": 2, "b": 2}),
                 ("boom", {"x": 1}), ("words", {"n": 1})]
        problems = [Problem(prompt=name, answer="", demonstration=None, meta={"tool": name, "args": args})
                    for name, args in calls]
        sandboxed = runner.sandbox().score(runner.task, problems, [""] * len(problems))
        assert sandboxed == score_in_process(runner.task, problems, [""] * len(problems))
        assert sandboxed.texts[0] == "line one: 5\nzwei: \u00fc \u2713" and sandboxed.texts[3] == "4.0"
    finally:
        runner.close()
