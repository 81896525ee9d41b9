"""Tools: plain Python functions with typed signatures, called by the model, run in the reward sandbox.

A tool is a module-level function whose parameters are annotated `str`, `int`, `float` or `bool` and which returns
a number (`-> float` or `-> int`) or text (`-> str`), registered with `@register_tool` (name = the function's name,
doc = its docstring). The model calls one in either of two formats, found anywhere in its action:

    <tool>calc("2+3")</tool>  or  <tool>calc(expression="2+3")</tool>            the built-in format (tiny model)
    <tool_call>{"name": "calc", "arguments": {"expression": "2+3"}}</tool_call>  the JSON tool-call format of
                                                                                 chat templates (Qwen2.5, Hermes)

Arguments are parsed strictly, never evaluated: the first format through `ast.parse` of one call whose arguments
are literals, positional then key=value (`ast.literal_eval` of each: `"2+3"` is a literal, `2+3` is not; positional
values go to the parameters in signature order, as in Python), the second through `json.loads`; each value must
match its parameter's annotation (an int is accepted for a float), every parameter without a default must be given,
no unknown names, none given twice.

The call itself runs in a reward-sandbox worker (`unipo.sandbox.RewardSandbox`: rlimits, seccomp, the audit hook,
a wall-clock limit, `ToolRunner(timeout_s=...)`), never in the training process: tool code and the arguments the
model wrote only meet there. The sandbox sends back a result code and the value's text (its text channel: at most
4096 bytes of UTF-8, `unipo.tasks.base.MAX_RESULT_TEXT`; a longer text is cut there), decoded as text and never
evaluated: a number is read back with `float()`, text is shown to the model as it is.

What the model reads back (`ToolResult.observation`), and what counts as a tool error (`env/tool_errors`):

| case                                         | observation                                      | error     |
|----------------------------------------------|--------------------------------------------------|-----------|
| ok, a number                                 | `= <value>` (an integral value without `.0`)     | none      |
| ok, text (a `-> str` tool)                   | the text itself (at most 4096 bytes)             | none      |
| no call, bad syntax, a non-literal argument  | `tool error: malformed call (<why>)`             | malformed |
| a name that is not a tool                    | `tool error: unknown tool <name> (tools: a, b)`  | unknown   |
| wrong argument names, types or count         | `tool error: bad arguments for <name> (<why>)`   | arguments |
| the tool raised                              | `tool error: <name> raised an exception`         | raised    |
| it returned what its annotation does not say | `tool error: <name> returned no number` (or      | raised    |
| (not a finite number; not a str for `-> str`)| `returned no text` for a `-> str` tool)          |           |
| it ran past the time limit                   | `tool error: <name> timed out`                   | timeout   |
| it did what the sandbox forbids (writing a   | `tool error: <name> was stopped by the sandbox`  | forbidden |
| file, a subprocess, ...) or crashed          |                                                  |           |

The episode goes on after every error: the observation is the environment's answer for that turn.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from unipo.core.registry import Registry
from unipo.tasks.base import Problem, Task

TOOLS: Registry[Callable[..., Any]] = Registry("tool")
_TYPES = {"str": str, "int": int, "float": float, "bool": bool, str: str, int: int, float: float, bool: bool}
_BUILTIN = re.compile(r"<tool>(.*?)</tool>", re.DOTALL)
_JSON = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
# The sandboxed wrapper's result codes (the number channel); the value itself travels as text.
_NUMBER, _TEXT, _RAISED, _WRONG_TYPE = 0, 1, 2, 3


def register_tool(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register a module-level function as a tool: its parameters annotated str, int, float or bool, and its
    docstring a description plus an `Args:` line for each parameter (what a chat template shows the model, through
    transformers' `get_json_schema`: `unipo.agents.tool_schemas`)."""
    from transformers.utils import get_json_schema

    signature = inspect.signature(fn)
    for param in signature.parameters.values():
        if param.annotation not in _TYPES or param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            raise ValueError(f"tool {fn.__name__}: parameter {param.name} must be a named str, int, float or bool")
    if _TYPES.get(signature.return_annotation) not in (float, int, str):
        raise ValueError(f"tool {fn.__name__}: annotate what it returns: -> float, -> int or -> str")
    try:
        get_json_schema(fn)
    except Exception as err:  # transformers' DocstringParsingException / TypeHintParsingException
        raise ValueError(f"tool {fn.__name__}: document it (a description, then an Args: line per parameter): "
                         f"{err}") from None
    return TOOLS.register(fn.__name__)(fn)


# -- parsing ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolCall:
    name: str
    args: dict[str, Any]


class ToolCallError(ValueError):
    """A call that cannot run: `kind` is malformed, unknown or arguments; the message is the observation."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def find_call(text: str) -> str | None:
    """The first tool call's body in `text` (either format), or None when the text calls no tool."""
    match = _BUILTIN.search(text) or _JSON.search(text)
    return match.group(0) if match else None


def parse_call(text: str, tools: dict[str, Callable[..., Any]]) -> ToolCall:
    """The tool call in `text`, checked against `tools`' signatures; ToolCallError otherwise."""
    builtin, as_json = _BUILTIN.search(text), _JSON.search(text)
    positional: list[Any] = []
    if builtin:
        name, positional, args = _parse_builtin(builtin.group(1).strip())
    elif as_json:
        name, args = _parse_json(as_json.group(1).strip())
    else:
        raise ToolCallError("malformed", "tool error: malformed call (no <tool>...</tool>)")
    if name not in tools:
        raise ToolCallError("unknown", f"tool error: unknown tool {name} (tools: {', '.join(sorted(tools))})")
    return ToolCall(name, _check_args(name, tools[name], _bind(name, tools[name], positional, args)))


def _parse_builtin(body: str) -> tuple[str, list[Any], dict[str, Any]]:
    """`name(literal, ..., key=literal, ...)` -> (name, positional values, keyword values); nothing is evaluated
    (`ast.literal_eval` of each argument: `1+2` or `x` is no literal)."""
    try:
        tree = ast.parse(body, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):  # (null bytes; nesting too deep for the parser)
        raise ToolCallError("malformed", "tool error: malformed call (syntax error)") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or any(
            isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        raise ToolCallError("malformed", "tool error: malformed call (want name(value, ..., key=value, ...))")

    def literal(node: ast.expr, what: str) -> Any:
        try:
            return ast.literal_eval(node)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ToolCallError("malformed", f"tool error: malformed call ({what} is not a literal)") from None

    positional = [literal(node, f"argument {i + 1}") for i, node in enumerate(call.args)]
    return call.func.id, positional, {k.arg: literal(k.value, k.arg) for k in call.keywords}


def _bind(name: str, fn: Callable[..., Any], positional: list[Any], args: dict[str, Any]) -> dict[str, Any]:
    """Positional values given to the tool's parameters in signature order (as in Python: not to keyword-only ones,
    and never a parameter also named)."""
    if not positional:
        return args
    order = [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
    if len(positional) > len(order):
        raise ToolCallError("arguments", f"tool error: bad arguments for {name} (at most {len(order)} positional)")
    twice = sorted(set(order[:len(positional)]) & set(args))
    if twice:
        raise ToolCallError("arguments", f"tool error: bad arguments for {name} ({', '.join(twice)} given twice)")
    return {**dict(zip(order, positional)), **args}


def _parse_json(body: str) -> tuple[str, dict[str, Any]]:
    try:
        data = json.loads(body)
    except ValueError:
        raise ToolCallError("malformed", "tool error: malformed call (not JSON)") from None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(
            data.get("arguments", {}), dict):
        raise ToolCallError("malformed", "tool error: malformed call (want {\"name\": ..., \"arguments\": {...}})")
    return data["name"], dict(data.get("arguments", {}))


def _check_args(name: str, fn: Callable[..., Any], args: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    unknown = sorted(set(args) - set(params))
    missing = [p for p in params if p not in args and params[p].default is inspect.Parameter.empty]
    if unknown or missing:
        why = f"unknown {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}"
        raise ToolCallError("arguments", f"tool error: bad arguments for {name} ({why})")
    for key, value in args.items():
        want = _TYPES[params[key].annotation]
        ok = type(value) is want or (want is float and type(value) is int)
        if not ok:
            raise ToolCallError("arguments", f"tool error: bad arguments for {name} ({key} must be {want.__name__})")
    return args


# -- running in the sandbox ------------------------------------------------------------------------------------
def returns_text(fn: Callable[..., Any]) -> bool:
    """Whether a tool is annotated `-> str` (its value is shown as text; any other tool's must be a number)."""
    return _TYPES.get(inspect.signature(fn).return_annotation) is str


class ToolTask(Task):
    """The sandbox's view of tool calls: `score(problem, _)` runs `problem.meta`'s call and returns (code, text):
    (_NUMBER, repr of the float) or (_TEXT, the text) for a value of the type the tool's annotation says, (_RAISED,
    "") when it raised, (_WRONG_TYPE, "") for any other value. Holds the functions by reference, so a worker
    imports their module."""

    name = "tool_call"
    max_new_tokens = 0
    scorer_is_safe = False
    returns_text = True
    # No warm-up: a sandbox worker warms a task up by scoring the first problem of its first chunk *before* it
    # confines itself (fine for a task's gold answer); here the problem holds the model's arguments.
    warm_up = False

    def __init__(self, tools: dict[str, Callable[..., Any]]) -> None:
        self.tools = dict(tools)

    def sample(self, n: int, *, seed: int, split: str = "train") -> list[Problem]:
        raise NotImplementedError("a tool call is not a task to train on")

    def score(self, problem: Problem, completion: str) -> tuple[float, str]:  # type: ignore[override]
        fn = self.tools[problem.meta["tool"]]
        try:
            value = fn(**problem.meta["args"])
        except Exception:  # noqa: BLE001 - any exception of the tool is the model's information, not ours
            return _RAISED, ""
        if returns_text(fn):
            return (_TEXT, value) if isinstance(value, str) else (_WRONG_TYPE, "")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _WRONG_TYPE, ""
        try:
            number = float(value)  # (an int beyond float's range raises OverflowError)
        except OverflowError:
            return _WRONG_TYPE, ""
        return (_NUMBER, repr(number)) if math.isfinite(number) else (_WRONG_TYPE, "")

    def check_score(self, value: object) -> float:
        code = float(value)  # type: ignore[arg-type]
        if code not in (_NUMBER, _TEXT, _RAISED, _WRONG_TYPE):
            raise ValueError(f"tool call: unknown result code {code!r}")
        return code


@dataclass(frozen=True)
class ToolResult:
    observation: str
    error: str | None = None  # None, malformed, unknown, arguments, raised, timeout or forbidden
    value: float | None = None  # a number-returning tool's value (None for a text-returning one, or an error)


class ToolRunner:
    """Runs the tool call in a model's action in a reward sandbox of its own (one worker, `timeout_s` per call)."""

    def __init__(self, tools: dict[str, Callable[..., Any]] | None = None, *, timeout_s: float = 2.0) -> None:
        self.tools = dict(tools if tools is not None else TOOLS)
        self.task = ToolTask(self.tools)
        self.timeout_s = timeout_s
        self._sandbox = None

    def sandbox(self):
        if self._sandbox is None:
            from unipo.sandbox import RewardSandbox

            self._sandbox = RewardSandbox(1, timeout_s=self.timeout_s, memory_mb=512)
        return self._sandbox

    def __call__(self, action: str) -> ToolResult:
        try:
            call = parse_call(action, self.tools)
        except ToolCallError as error:
            return ToolResult(str(error), error.kind)
        problem = Problem(prompt=call.name, answer="", demonstration=None, meta={"tool": call.name, "args": call.args})
        result = self.sandbox().score(self.task, [problem], [""])
        if result.timeouts:
            return ToolResult(f"tool error: {call.name} timed out", "timeout")
        if result.errors:
            return ToolResult(f"tool error: {call.name} was stopped by the sandbox", "forbidden")
        code, text = result.rewards[0], result.texts[0]
        if code == _RAISED:
            return ToolResult(f"tool error: {call.name} raised an exception", "raised")
        if code == _WRONG_TYPE:
            wanted = "text" if returns_text(self.tools[call.name]) else "number"
            return ToolResult(f"tool error: {call.name} returned no {wanted}", "raised")
        if code == _TEXT:
            return ToolResult(text)
        try:
            value = float(text)  # the wrapper's repr of a finite float: read back, never evaluated
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            return ToolResult(f"tool error: {call.name} was stopped by the sandbox", "forbidden")  # a forged record
        shown = str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.6g}"
        return ToolResult(f"= {shown}", None, value)

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None


# -- built-in tools --------------------------------------------------------------------------------------------
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}


@register_tool
def calc(expression: str) -> float:
    """The value of an arithmetic expression over numbers with + - * / // % and parentheses (no powers, no names).

    Args:
        expression: the expression, e.g. "37*24" or "(2+3)*4"
    """
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = value(node.operand)
            return -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"unsupported expression element {type(node).__name__}")

    return value(ast.parse(expression, mode="eval").body)
