"""The `unipo` command.

    unipo demo                                   the main job: SFT warm start, then hybrid RL
    unipo train --recipe R --task T [key=value]  train with any recipe
    unipo train --config run.yaml [key=value]    train from a config file (unipo recipes show R --yaml)
    unipo train --recipe dpo --data pairs.jsonl  preference pairs (online_dpo, spin, sppo make their own)
    unipo sft --task T                           supervised fine-tuning on demonstrations
    unipo eval --model DIR --task T --k 1,4,16   accuracy and unbiased pass@k
    unipo rm --data PAIRS --out DIR              a Bradley-Terry reward model (rollout.reward=rm:DIR)
    unipo plot RUN [RUN ...]                     learning curves as PNGs (one per run, one overlay)
    unipo watch RUN                              the latest metrics of a run, live
    unipo recipes [show NAME]                    the catalogue

Errors: a mistake in the input (an unknown recipe, task or config key, a value of the wrong type or out of
range, a missing or damaged model folder or data file, a prompt longer than the model's context, an --out that
cannot be written, a full disk, a run that diverged) prints ONE line `error: ...` to stderr and exits with
code 2, checked before anything expensive where it can be. Anything else is a bug in unipo: the traceback, a
last line saying so, and exit code 1. Usage errors of the command line itself (an unknown --option) exit 2.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="unipo: every RL post-training method for language models as a recipe of one estimator.")
recipes_app = typer.Typer(add_completion=False, invoke_without_command=True,
                          help="List the recipes, or show one's resolved config.")
app.add_typer(recipes_app, name="recipes")

# Mistakes in the input. The project's own user-error types are ValueErrors (ModelSourceError,
# PromptTooLongError, NonFiniteLogitsError, RunFolderError, ...); NonFiniteLossError (a diverged run) and a full
# disk (OSError ENOSPC) are recognised by `user_error_message`.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               FileExistsError)
# OSErrors about a path the user gave (besides USER_ERRORS' own types): read-only file system, name too long, ...
_PATH_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR,
                errno.EISDIR, errno.ENOENT, errno.EEXIST)
BUG_REPORT = ("unipo: internal error: this is a bug in unipo, not a mistake in your input; please report it to the "
              "unipo maintainers (the project's issue tracker) with the command you ran and the traceback above")


def one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def fail(message: str) -> None:
    """Print `error: <message>` (one line) to stderr and exit with code 2. An OSError's text
    (`[Errno 13] Permission denied: 'x'`) reads as `cannot use 'x': permission denied`."""
    os_error = re.fullmatch(r"\[Errno -?\d+\] (.+?): ('.*'|\".*\")", one_line(message))
    if os_error:
        message = f"cannot use {os_error.group(2)}: {os_error.group(1).lower()}"
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code=2)


def user_error_message(error: BaseException) -> str | None:
    """The one line to print for a mistake in the input, or None when `error` is a bug in unipo."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {error.filename!r}" if error.filename else ""
        return f"no space left on device{where}: free some space or choose another --out"
    if isinstance(error, OSError) and (isinstance(error, USER_ERRORS) or error.errno in _PATH_ERRNOS):
        what = (error.strerror or type(error).__name__).lower()
        return f"cannot use {error.filename!r}: {what}" if error.filename else one_line(str(error))
    trainer = sys.modules.get("unipo.trainer")
    if isinstance(error, ValueError) or (trainer is not None and isinstance(error, trainer.NonFiniteLossError)):
        return one_line(str(error))
    return None


def preflight(config) -> None:
    """Everything about a new run that can be checked before a model loads or a step runs, one line each: the
    task builds and both its splits have problems (an empty test split is an error now, not after training);
    the model name or folder (config, weights, tokenizer; no weights read); prompts (a sample of up to 64 per
    split, or every problem of a JSONL file) plus the completion budget (and, for recipes with expert rows, the
    demonstrations) fit the model's context; --out can be written; the trackers `log` names are installed."""
    from unipo.engine import check_engine
    from unipo.models import check_prompt_lengths, format_prompt, inspect_model
    from unipo.tasks.base import get_task
    from unipo.tracking import check_installed

    check_installed(config.log)
    check_engine(config)  # rollout.engine=vllm without vLLM installed: say how to install it, load nothing
    pairs = None
    if config.recipe.data == "pairs":  # offline preference pairs: every row checked now (unipo.pairs)
        if not config.pairs:
            raise ValueError(f"recipe {config.recipe.name} trains on preference pairs: give them with --data FILE")
        from unipo.pairs import load_pairs

        pairs = load_pairs(config.pairs)
    if config.rollout.reward:  # each module imports and has the function (unipo.rewards)
        from unipo.rewards import check_reward_functions

        check_reward_functions(config.rollout.reward)
    task = get_task(config.task)
    finite = list(getattr(task, "problems", None) or [])  # a JSONL file: check every problem
    problems = []
    for split in ("test", "train"):
        problems += task.sample(1 if finite else 64, seed=config.seed, split=split)  # an empty split raises here
    problems = finite or problems
    tokenizer, context = inspect_model(config.model)
    budget = config.rollout.max_new_tokens or task.max_new_tokens

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompts = [tokens(format_prompt(tokenizer, p.prompt)) for p in problems]
    check_prompt_lengths(prompts, budget, context)
    if config.recipe.uses_expert:
        rows = [n + tokens(p.demonstration or p.answer) + 1 for n, p in zip(prompts, problems)]
        check_prompt_lengths(rows, 0, context, what="prompt + demonstration row")
    if pairs is not None:  # every pair's prompt + longer answer, encoded as the trainer encodes them
        from unipo.pairs import encode_answer, encode_prompt

        rows = [len(encode_prompt(tokenizer, p.prompt)) + max(len(encode_answer(tokenizer, p.prompt, a))
                                                              for a in (p.chosen, p.rejected)) for p in pairs]
        check_prompt_lengths(rows, 0, context, what="preference pair")  # prompt + its longer answer
    if config.out:
        _check_writable(config.out)


def _check_writable(out: str) -> None:
    path = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {out!r} is a file, not a folder")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--out {out!r}: {existing!r} is a file, not a folder")
    try:  # a real write (os.access says yes to root even on a read-only or virtual file system)
        os.rmdir(tempfile.mkdtemp(prefix=".unipo-probe-", dir=existing))
    except OSError as error:
        raise ValueError(f"--out {out!r}: cannot write in {existing!r} "
                         f"({(error.strerror or type(error).__name__).lower()})") from None


def parse_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        if "=" not in item:
            fail(f"expected key=value, got {item!r} (e.g. rollout.group_size=4 or optim.lr=1e-4)")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    return overrides


def build_config(recipe: str, task: str, model: str, steps: int, seed: int, out: Optional[str],
                 overrides: list[str], pairs: Optional[str] = None, env: Optional[str] = None):
    from unipo.config import TrainConfig, apply_overrides
    from unipo.recipes import get_recipe

    _check_task(task)
    config = TrainConfig(recipe=get_recipe(recipe), task=task, model=model, steps=steps, seed=seed,
                         out=out or default_out(recipe, env or task))
    if env is not None:  # --env: the environment of a multi-turn recipe (recipe.data=episodes or tree_episodes)
        config = apply_overrides(config, {"env": env}, parse=False)
    config = apply_overrides(config, parse_overrides(overrides))
    if pairs is not None:  # --data: the preference pairs (recipe.data=pairs)
        config = apply_overrides(config, {"pairs": pairs}, parse=False)
    preflight(config)
    return config


def _check_task(task: str) -> None:
    from unipo.tasks.base import get_task

    try:
        get_task(task)  # fail early, before a model is built
    except OSError as error:  # jsonl:<a directory>, a missing file: one line naming the path
        raise ValueError(f"task {task!r}: {user_error_message(error) or error}") from None


def _typed(ctx: typer.Context, names: tuple[str, ...]) -> dict:
    """The options among `names` typed on the command line (not left at their defaults)."""
    return {name: ctx.params[name] for name in names
            if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}


def config_from_file(ctx: typer.Context, path: str, overrides: list[str]):
    """`train --config FILE`: the file, then the options typed on the command line, then key=value."""
    from unipo.config import apply_overrides, load_config_file

    given = _typed(ctx, ("recipe", "task", "model", "steps", "seed", "out"))
    config = load_config_file(path, recipe=given.pop("recipe", None))
    config = apply_overrides(config, given, parse=False)
    config = apply_overrides(config, parse_overrides(overrides))
    if ctx.params.get("data") is not None:  # --data: the preference pairs (recipe.data=pairs)
        config = apply_overrides(config, {"pairs": ctx.params["data"]}, parse=False)
    if ctx.params.get("env") is not None:  # --env: the environment of a multi-turn recipe
        config = apply_overrides(config, {"env": ctx.params["env"]}, parse=False)
    if config.out is None:
        config = apply_overrides(config, {"out": default_out(config.recipe.name, config.task)}, parse=False)
    _check_task(config.task)
    preflight(config)
    return config


def default_out(recipe: str, task: str) -> str:
    safe_task = task.replace(":", "_").replace("/", "_").replace("=", "")
    return str(Path("runs") / f"{recipe}-{safe_task}-{time.strftime('%Y%m%d-%H%M%S')}")


def run_training(config, resume: bool) -> None:
    from unipo.plotting import plot_run
    from unipo.trainer import NonFiniteLossError, resume_run, start_run

    trainer = resume_run(config.out, steps=config.steps) if resume else start_run(config)
    try:
        trainer.fit()
    except NonFiniteLossError as err:
        fail(str(err))
    result = trainer.evaluate()
    if trainer.run is not None:
        trainer.run.close_trackers()
    png = plot_run(config.out)
    typer.echo(f"held-out accuracy {result['accuracy']:.3f}; run folder {config.out}; plot {png}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    recipe: str = typer.Option("grpo", help="Recipe name (see `unipo recipes`)."),
    task: str = typer.Option("addition",
                             help="Task: addition, countdown, sort, multiplication, rg:<name>, jsonl:<path>, "
                                  "hf:<dataset>[:prompt=<column>,answer=<column>,...]."),
    model: str = typer.Option("tiny", help="'tiny' (embedded, built locally), a local path or a hub id."),
    steps: Optional[int] = typer.Option(
        None, help="Training steps, one rollout batch each (default 50; with --resume, the total to reach)."),
    out: Optional[str] = typer.Option(None, help="Run folder (default runs/<recipe>-<task>-<time>); it is the run's "
                                                 "identity: --resume continues the run in this folder."),
    seed: int = typer.Option(0, help="Seed for sampling, tasks and initialisation."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its newest intact checkpoint, with its "
                                            "saved settings."),
    overwrite: bool = typer.Option(False, help="Empty --out first if it holds a run (a new run refuses a non-empty "
                                               "folder)."),
    config_file: Optional[str] = typer.Option(
        None, "--config", help="Start from this YAML config (a run's config.yaml, or `unipo recipes show NAME "
                               "--yaml`); options typed here and key=value override it."),
    nproc: int = typer.Option(1, min=1, help="Processes on this machine (data parallel, parallel=ddp|fsdp): "
                                             "launches torchrun; see docs/scaling.md."),
    data: Optional[str] = typer.Option(
        None, "--data", help="Preference pairs for an offline pair recipe (dpo, ipo, ...): a JSONL file (prompt, "
                             "chosen, rejected), a .json/.parquet file, a save_to_disk folder or a hub id."),
    env: Optional[str] = typer.Option(
        None, "--env", help="Environment of a multi-turn recipe (multiturn_grpo, mt_grpo, tree_grpo): guess_number, "
                            "calculator (unipo.envs); its episodes replace the task's prompts."),
) -> None:
    """Train with any recipe.

    Extra `key=value` arguments override the config (e.g. rollout.group_size=4 optim.lr=3e-4 recipe.kl_coef=0.01).

    A new run refuses an --out folder that holds anything, unless --overwrite (which deletes the run in it first).

    While a run trains it holds --out/.lock: a second run into the same folder is refused.

    A checkpoint is written every save_every steps (default 25) and at the end (save_every=0: only at the end).

    --resume continues the run in --out, wherever that folder now is, from its newest checkpoint that verifies.

    --resume keeps the run's saved settings: a differing --recipe, --task, --model, --seed or key=value is an error.

    With --resume, --steps is the total to reach (it may differ from the saved one).

    --config FILE starts from a YAML config; --recipe replaces its recipe section, and --task, --model, --steps,
    --seed, --out and key=value override its keys.

    --nproc N runs N processes under torchrun (the same as `torchrun --nproc_per_node N -m unipo train ...`).
    """
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        if not resume:  # a bad setting: one line here, not a traceback from each of torchrun's ranks
            try:
                if config_file:
                    config_from_file(ctx, config_file, ctx.args)
                else:
                    build_config(recipe, task, model, 50 if steps is None else steps, seed, out, ctx.args,
                                 pairs=data, env=env)
            except USER_ERRORS as err:
                fail(str(err))
        raise typer.Exit(launch_torchrun(nproc))
    try:
        if resume:
            if not out:
                fail("--resume needs --out RUN_DIR")
            if overwrite:
                fail("--resume and --overwrite exclude each other (--overwrite deletes the run --resume continues)")
            if config_file:
                fail("--resume continues a run with its saved settings; --config starts a new one (drop one)")
            from unipo.trainer import resume_run

            given = {name: ctx.params[name] for name in ("recipe", "task", "model", "seed")  # typed, not defaulted
                     if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}
            overrides = {**parse_overrides(ctx.args), **({"pairs": data} if data is not None else {})}
            trainer = resume_run(out, steps=steps, given=given, overrides=overrides)
        else:
            from unipo.trainer import start_run

            if config_file:
                config = config_from_file(ctx, config_file, ctx.args)
            else:
                config = build_config(recipe, task, model, 50 if steps is None else steps, seed, out, ctx.args,
                                      pairs=data, env=env)
            trainer = start_run(config, overwrite=overwrite)
        _fit_and_report(trainer)
    except USER_ERRORS as err:
        fail(str(err))


def launch_torchrun(nproc: int) -> int:
    """This `unipo train` command again as `nproc` processes under torchrun on this machine; its exit code."""
    import subprocess

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "unipo", *args]
    return subprocess.run(command).returncode


def _fit_and_report(trainer) -> None:
    """`unipo train`'s end: fit, then the held-out evaluation and the plot, still holding the run's lock."""
    from unipo.distributed import shutdown
    from unipo.plotting import plot_run
    from unipo.trainer import NonFiniteLossError

    try:
        trainer.fit()
    except NonFiniteLossError as err:
        fail(str(err))
    run = trainer.run  # None on the ranks other than 0 of a multi-process run: they only evaluate with rank 0
    if run is not None:
        run.lock()
    try:
        result = trainer.evaluate()
        png = plot_run(run.path) if run is not None else None
    finally:
        if run is not None:
            run.unlock()
            run.close_trackers()
        if trainer.parallel.active:
            shutdown(trainer)
    if run is not None:
        typer.echo(f"held-out accuracy {result['accuracy']:.3f}; run folder {run.path}; plot {png}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sft(
    ctx: typer.Context,
    task: str = typer.Option("addition", help="Task whose demonstrations to imitate."),
    model: str = typer.Option("tiny", help="'tiny', a local path or a hub id."),
    steps: int = typer.Option(100, help="Training steps."),
    out: Optional[str] = typer.Option(None, help="Run folder."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Supervised fine-tuning on the task's expert demonstrations (the `sft` recipe)."""
    try:
        run_training(build_config("sft", task, model, steps, seed, out, ctx.args), resume=False)
    except USER_ERRORS as err:
        fail(user_error_message(err) or str(err))


@app.command(name="rm")
def reward_model(
    data: str = typer.Option(..., help="Preference pairs: a JSONL file, a datasets file or folder, or a hub id."),
    out: str = typer.Option(..., help="Folder to write the reward model to (used as rollout.reward=rm:FOLDER)."),
    model: str = typer.Option("tiny", help="Backbone: 'tiny', a local folder or a hub id."),
    steps: int = typer.Option(100, min=1, help="Optimizer steps."),
    lr: float = typer.Option(1e-4, help="AdamW learning rate."),
    batch_size: int = typer.Option(16, min=1, help="Pairs per step."),
    held_out: float = typer.Option(0.1, help="Fraction of the pairs held out for accuracy (seeded shuffle)."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Train a Bradley-Terry reward model (the causal LM + a scalar head) on preference pairs.

    Reports pairwise accuracy on held-out pairs before and after. Use it as a reward for any RL recipe with
    rollout.reward=rm:FOLDER[@WEIGHT] (added to the task verifier's reward), or as the judge of the preference
    recipes with oracle=rm:FOLDER.
    """
    try:
        if not 0.0 < held_out < 1.0:
            fail(f"--held-out must be a fraction in (0, 1), got {held_out}")
        if not 0.0 < lr < float("inf"):
            fail(f"--lr must be a finite number > 0, got {lr}")
        import random

        import torch

        from unipo.models import load_model
        from unipo.pairs import load_pairs
        from unipo.reward_model import RewardModel, pairwise_accuracy, save_reward_model, train_reward_model

        pairs = list(load_pairs(data))
        random.Random(seed).shuffle(pairs)
        n_test = max(1, round(held_out * len(pairs)))
        if len(pairs) - n_test < 1:
            fail(f"{data}: {len(pairs)} pair(s) leave nothing to train on after holding out {n_test}")
        test, train_pairs = pairs[:n_test], pairs[n_test:]
        torch.manual_seed(seed)
        backbone, tokenizer = load_model(model)
        rm = RewardModel(backbone, seed=seed)
        before = pairwise_accuracy(rm, tokenizer, test)
        metrics = train_reward_model(rm, tokenizer, train_pairs, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
        after = pairwise_accuracy(rm, tokenizer, test)
        save_reward_model(rm, tokenizer, out)
    except USER_ERRORS as err:
        fail(user_error_message(err) or str(err))
    typer.echo(f"{len(train_pairs)} training pairs, {len(test)} held out: pairwise accuracy {before:.3f} -> "
               f"{after:.3f} (loss {metrics['rm/loss_first']:.3f} -> {metrics['rm/loss']:.3f}); reward model in {out} "
               f"(rollout.reward=rm:{out})")


@app.command(name="eval")
def evaluate(
    model: str = typer.Option(..., help="Model folder (e.g. RUN/checkpoint-N), hub id or 'tiny'."),
    task: str = typer.Option("addition", help="Task."),
    n: int = typer.Option(100, help="Held-out problems."),
    k: str = typer.Option("1,4,16", help="Comma-separated k for pass@k (samples per problem = max k)."),
    temperature: float = typer.Option(1.0, help="Sampling temperature for pass@k."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Greedy accuracy and the unbiased pass@k estimator on the task's test split."""
    try:
        ks = tuple(int(x) for x in k.split(",") if x.strip().lstrip("+").isdigit())
        if not ks or min(ks) < 1 or len(ks) != len(k.split(",")):
            fail(f"--k must list positive integers, e.g. 1,4,16, got {k!r}")
        if n < 1:
            fail(f"--n must be >= 1, got {n}")
        if not 0 < temperature < float("inf"):
            fail(f"--temperature must be a finite number > 0, got {temperature}")
        from unipo.evaluation import evaluate_model
        from unipo.models import load_model
        from unipo.tasks.base import get_task

        the_task = get_task(task)
        the_task.sample(1, seed=seed, split="test")  # an empty test split fails here, before the model loads
        the_model, tokenizer = load_model(model)
        result = evaluate_model(the_model, tokenizer, the_task, n=n, ks=ks, seed=seed,
                                max_new_tokens=the_task.max_new_tokens, temperature=temperature)
    except USER_ERRORS as err:
        fail(user_error_message(err) or str(err))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model} on {task} ({n} held-out problems)")
    for key in result:
        table.add_column(key, justify="right")
    table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in result.values()))
    Console().print(table)


@app.command()
def episodes(
    env: str = typer.Option(..., "--env", help="Environment (unipo.envs): guess_number, calculator, frozen_lake, "
                                               "gym:<id>."),
    out: str = typer.Option(..., help="The episode file to write (JSON lines, one episode a line)."),
    model: str = typer.Option("tiny", help="Model folder (e.g. RUN/checkpoint-N), hub id or 'tiny'."),
    problems: int = typer.Option(64, help="Training problems of the environment."),
    group: int = typer.Option(8, help="Episodes per problem."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    seed: int = typer.Option(0, help="Seed (problems and sampling)."),
) -> None:
    """Record a fixed set of episodes: the model plays `--group` episodes of each of `--problems` training problems;
    train on them offline with SWEET-RL (`recipe.data_params.trajectories=FILE`, docs/agents.md)."""
    try:
        if problems < 1 or group < 1:
            fail(f"--problems and --group must be >= 1, got {problems} and {group}")
        if not 0 < temperature < float("inf"):
            fail(f"--temperature must be a finite number > 0, got {temperature}")
        if os.path.isdir(out):
            fail(f"--out {out!r} is a folder; give the episode file's path")
        _check_writable(os.path.dirname(os.path.abspath(out)))  # its folder (made by the write if missing)
        import torch
        from tqdm import tqdm

        from unipo.agents import episode_stats, run_episodes
        from unipo.engine.native import NativeEngine
        from unipo.envs import get_env
        from unipo.episode_files import episode_record, problem_record, write_episodes
        from unipo.models import load_model

        env_cls = get_env(env)
        drawn = env_cls.sample(problems, seed=seed, split="train")  # (an unknown env fails here, before the model)
        problem_record(env, drawn[0])  # problems that cannot be JSON fail here, before the model loads
        the_model, tokenizer = load_model(model)
        engine, generator = NativeEngine(the_model), torch.Generator(device=the_model.device).manual_seed(seed)
        played, records = [], []
        chunk = 16  # problems a batch of episodes (one progress tick)
        for start in tqdm(range(0, len(drawn), chunk), desc=f"episodes of {env}", unit="batch"):
            part = drawn[start:start + chunk]
            batch = run_episodes(engine, tokenizer, env_cls, part, group, max_new_tokens=env_cls.max_action_tokens,
                                 temperature=temperature, generator=generator)
            played += batch
            records += [episode_record(env, start + e.group, e) for e in batch]
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        write_episodes(out, records)
    except USER_ERRORS as err:
        fail(user_error_message(err) or str(err))
    stats = episode_stats(played)
    typer.echo(f"wrote {len(records)} episodes of {len(drawn)} problems to {out} (success {stats['env/success']:.3f}, "
               f"{stats['env/turns_mean']:.2f} turns on average)")


@app.command()
def plot(runs: list[str] = typer.Argument(..., help="Run folder(s).", metavar="RUN..."),
         out: Optional[str] = typer.Option(None, help="PNG path: a single run's plot (default RUN/curves.png), or "
                                                      "the overlay of several (default next to the runs)."),
         smooth: Optional[int] = typer.Option(None, min=1, help="Steps in the trailing mean (default ~a tenth of "
                                                                "the run).")) -> None:
    """Learning curves as PNGs: reward, held-out accuracy, loss, KL, entropy, clip fraction, response length.

    One PNG per run (RUN/curves.png) and, given several runs, one overlaying them (legend: the run names).
    """
    from unipo.plots import plot_runs

    notes: list[str] = []
    try:
        written = plot_runs(runs, out, smooth=smooth, notes=notes)
    except USER_ERRORS as err:
        fail(user_error_message(err) or str(err))
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    for path in written:
        typer.echo(str(path))


@app.command()
def watch(run: str = typer.Argument(..., help="Run folder."),
          once: bool = typer.Option(False, help="Print the table once and exit."),
          interval: float = typer.Option(2.0, min=0.1, help="Seconds between refreshes.")) -> None:
    """A live view of a run folder: the latest value of each metric, refreshed until the run finishes.

    For curves while it trains: `tensorboard --logdir RUN` (with log=tensorboard), or `unipo plot RUN`.
    """
    from unipo.tracking import watch as watch_run

    try:
        watch_run(run, once=once, interval=interval)
    except USER_ERRORS as err:
        fail(user_error_message(err) or str(err))
    except KeyboardInterrupt:
        pass


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def compare(
    ctx: typer.Context,
    recipes: str = typer.Option("grpo,luffy,chord", help="Comma-separated recipe names."),
    seeds: str = typer.Option("2", help="N (seeds 0..N-1), or a comma-separated list of seeds (e.g. 3,7)."),
    steps: int = typer.Option(20, help="RL steps per run."),
    task: str = typer.Option("sort", help="Task (as `unipo train --task`)."),
    model: str = typer.Option("tiny", help="'tiny' (a fresh initialisation per seed), a local path or a hub id."),
    baseline: Optional[str] = typer.Option(None, help="The recipe the others are differenced against, paired by "
                                                      "seed (default: the first)."),
    warm_start_steps: int = typer.Option(200, help="The most SFT steps of the shared warm start per seed (0: none; "
                                                   "every run starts from the model)."),
    warm_start_target: float = typer.Option(0.2, help="Stop the warm start once pass@8 on train-split validation "
                                                      "problems reaches this (0: run all its steps)."),
    eval_problems: int = typer.Option(300, help="Held-out problems per evaluation."),
    out: str = typer.Option("runs/compare", help="Folder for compare.json, compare.md, compare.png and the warm "
                                                 "starts."),
    workers: int = typer.Option(1, help="Runs in parallel (processes, one torch thread each)."),
    quick: bool = typer.Option(False, help="Small batches, a short warm start and few held-out problems (seconds "
                                           "per run; options you type win)."),
    fresh_warm_start: bool = typer.Option(False, help="Redo the warm starts even if saved ones match."),
    progress: bool = typer.Option(True, help="A progress bar over the runs."),
) -> None:
    """Train several recipes from one shared SFT warm start per seed and compare them on held-out problems.

    Writes OUT/compare.json (every number), OUT/compare.md (the table) and OUT/compare.png (curves, spread bands).

    The table: mean ± std over seeds, and differences against the warm start and against --baseline, paired by seed.

    Extra `key=value` arguments override every run's config (e.g. rollout.group_size=4 optim.lr=3e-4).
    """
    import dataclasses

    try:
        from unipo.compare import QUICK, CompareConfig, markdown_table, output_paths, run_compare

        try:
            seed_list = [int(x) for x in seeds.split(",") if x.strip()]
        except ValueError:
            seed_list = []
        if not seed_list:
            fail(f"--seeds must be N or a comma-separated list of seeds, got {seeds!r}")
        given = _typed(ctx, ("eval_problems", "warm_start_steps", "warm_start_target"))
        settings = dict(QUICK) if quick else {}  # the options typed win over --quick's
        for option, key in (("eval_problems", "eval_problems"), ("warm_start_steps", "warm_steps"),
                            ("warm_start_target", "warm_target_pass8")):
            if not quick or option in given:
                settings[key] = ctx.params[option]
        cfg = CompareConfig(recipes=tuple(r.strip() for r in recipes.split(",") if r.strip()),
                            seeds=tuple(range(seed_list[0])) if "," not in seeds else tuple(seed_list),
                            steps=steps, task=task, model=model, baseline=baseline, out=out, workers=workers,
                            overrides=parse_overrides(ctx.args), **settings)
        _check_task(cfg.task)
        first = cfg.run_config(cfg.recipes[0], cfg.seeds[0])
        preflight(dataclasses.replace(first, model=cfg.model, out=cfg.out))
        command = "unipo " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["compare"] else None
        summary = run_compare(cfg, progress=progress, fresh_warm_start=fresh_warm_start, command=command)
    except USER_ERRORS as err:
        fail(str(err))
    typer.echo(markdown_table(summary))
    for row in summary["table"]:
        for error in row["errors"]:
            typer.echo(f"{row['recipe']} failed: {one_line(error)}", err=True)
    paths = output_paths(cfg)
    typer.echo(f"wrote {paths['json']}, {paths['md']} and {paths['png']} ({summary['total_seconds'] / 60:.1f} min)")


@app.command()
def demo(
    out: str = typer.Option("runs/demo", help="Folder for the demo's runs."),
    seed: int = typer.Option(0, help="Seed."),
    quick: bool = typer.Option(False, help="A much shorter demo (used by the tests)."),
) -> None:
    """The main job: tiny model, SFT warm start, hybrid-policy RL, held-out accuracy before and after.

    Builds the embedded tiny model locally, warm-starts it with SFT, trains it with a hybrid-policy recipe, and
    prints held-out accuracy and pass@k after each stage.
    """
    from unipo.demo import run_demo

    run_demo(out=out, seed=seed, quick=quick)


@recipes_app.callback()
def recipes_list(ctx: typer.Context, markdown: bool = typer.Option(
        False, "--markdown", help="Print the full catalogue as Markdown (docs/recipes.md).")) -> None:
    """The catalogue: name, family, mechanism, paper."""
    if ctx.invoked_subcommand is not None:
        return
    if markdown:
        from unipo.recipes import catalogue_markdown

        typer.echo(catalogue_markdown(), nl=False)
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from unipo.recipes import RECIPES

    table = Table(title="unipo recipes")
    for col in ("name", "family", "mechanism", "updates/batch", "paper"):
        table.add_column(col, overflow="fold", justify="right" if col == "updates/batch" else "left")
    for name in RECIPES:
        r = RECIPES[name]
        # escape: summaries hold brackets (E_ref[exp(r/beta)]) that rich would read as markup
        table.add_row(r.name, r.family, escape(r.summary), str(r.updates_per_batch), escape(r.paper))
    Console(width=max(120, Console().width)).print(table)


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="Recipe name."),
                 as_yaml: bool = typer.Option(False, "--yaml", help="A whole run config with this recipe, to edit "
                                                                    "and pass to `unipo train --config`.")) -> None:
    """The recipe's resolved config (every slot), as YAML."""
    from unipo.config import TrainConfig, dump_yaml
    from unipo.recipes import RECIPES

    try:
        recipe = RECIPES.get(name)
    except ValueError as err:
        fail(str(err))
    if as_yaml:
        typer.echo(f"# unipo train --config THIS_FILE [key=value ...]: a run with recipe {name}, every key at its "
                   f"default\n{dump_yaml(TrainConfig(recipe=recipe))}", nl=False)
        return
    typer.echo(dump_yaml(recipe))


def main(argv: list[str] | None = None) -> None:
    """The `unipo` entry point: a mistake in the input is one line `error: ...` and exit code 2; an unexpected
    error is a bug: its traceback, a last line saying so, exit code 1."""
    try:
        app(args=argv, prog_name="unipo")
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - the one place that decides how every error is reported
        message = user_error_message(error)
        if message is not None:
            typer.echo(f"error: {message}", err=True)
            sys.exit(2)
        traceback.print_exc()
        typer.echo(BUG_REPORT, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
