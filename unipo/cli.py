"""The `unipo` command.

    unipo demo                                   the main job: SFT warm start, then hybrid RL
    unipo train --recipe R --task T [key=value]  train with any recipe
    unipo sft --task T                           supervised fine-tuning on demonstrations
    unipo eval --model DIR --task T --k 1,4,16   accuracy and unbiased pass@k
    unipo plot RUN                               learning curves as a PNG
    unipo recipes [show NAME]                    the catalogue

Bad input (an unknown recipe, task, model path or config key) prints one line naming the
valid choices and exits with code 2: no traceback.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="unipo: every RL post-training method for language models as a recipe of one estimator.")
recipes_app = typer.Typer(add_completion=False, invoke_without_command=True,
                          help="List the recipes, or show one's resolved config.")
app.add_typer(recipes_app, name="recipes")

USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def fail(message: str) -> None:
    typer.echo(f"unipo: error: {message}", err=True)
    raise typer.Exit(code=2)


def parse_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        if "=" not in item:
            fail(f"expected key=value, got {item!r} (e.g. rollout.group_size=4 or optim.lr=1e-4)")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    return overrides


def build_config(recipe: str, task: str, model: str, steps: int, seed: int, out: Optional[str],
                 overrides: list[str]):
    from unipo.config import TrainConfig, apply_overrides
    from unipo.recipes import get_recipe
    from unipo.tasks.base import get_task

    get_task(task)  # fail early, before a model is built
    config = TrainConfig(recipe=get_recipe(recipe), task=task, model=model, steps=steps, seed=seed,
                         out=out or default_out(recipe, task))
    return apply_overrides(config, parse_overrides(overrides))


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
    png = plot_run(config.out)
    typer.echo(f"held-out accuracy {result['accuracy']:.3f}; run folder {config.out}; plot {png}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    recipe: str = typer.Option("grpo", help="Recipe name (see `unipo recipes`)."),
    task: str = typer.Option("addition",
                             help="Task: addition, countdown, sort, multiplication, rg:<name>, jsonl:<path>."),
    model: str = typer.Option("tiny", help="'tiny' (embedded, built locally), a local path or a hub id."),
    steps: Optional[int] = typer.Option(
        None, help="Training steps, one rollout batch each (default 50; with --resume, the total to reach)."),
    out: Optional[str] = typer.Option(None, help="Run folder (default runs/<recipe>-<task>-<time>)."),
    seed: int = typer.Option(0, help="Seed for sampling, tasks and initialisation."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its latest checkpoint."),
) -> None:
    """Train with any recipe.

    Extra `key=value` arguments override the config (e.g. rollout.group_size=4 optim.lr=3e-4 recipe.kl_coef=0.01).
    """
    try:
        if resume:
            if not out:
                fail("--resume needs --out RUN_DIR")
            from unipo.runs import RunFolder

            config = RunFolder(out).read_config()
            config = dataclasses.replace(config, steps=steps or config.steps)
        else:
            config = build_config(recipe, task, model, steps or 50, seed, out, ctx.args)
        run_training(config, resume)
    except USER_ERRORS as err:
        fail(str(err).strip("'\""))


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
        fail(str(err).strip("'\""))


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
        ks = tuple(int(x) for x in k.split(",") if x.strip())
        if not ks or min(ks) < 1:
            fail(f"--k must list positive integers, got {k!r}")
        from unipo.evaluation import evaluate_model
        from unipo.models import load_model
        from unipo.tasks.base import get_task

        the_task = get_task(task)
        the_model, tokenizer = load_model(model)
        result = evaluate_model(the_model, tokenizer, the_task, n=n, ks=ks, seed=seed,
                                max_new_tokens=the_task.max_new_tokens, temperature=temperature)
    except USER_ERRORS as err:
        fail(str(err).strip("'\""))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model} on {task} ({n} held-out problems)")
    for key in result:
        table.add_column(key, justify="right")
    table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in result.values()))
    Console().print(table)


@app.command()
def plot(run: str = typer.Argument(..., help="Run folder."),
         out: Optional[str] = typer.Option(None, help="PNG path (default RUN/curves.png).")) -> None:
    """Plot a run's reward and accuracy curves to a PNG."""
    from unipo.plotting import plot_run

    try:
        typer.echo(str(plot_run(run, out)))
    except USER_ERRORS as err:
        fail(str(err))


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
def recipes_show(name: str = typer.Argument(..., help="Recipe name.")) -> None:
    """The recipe's resolved config (every slot), as YAML."""
    from unipo.config import dump_yaml
    from unipo.recipes import RECIPES

    try:
        recipe = RECIPES.get(name)
    except ValueError as err:
        fail(str(err))
    typer.echo(dump_yaml(recipe))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
