"""Experiment tracking: TensorBoard and Weights & Biases mirror the run folder's logs, and `unipo watch`.

metrics.jsonl and eval.jsonl are always written; `log=tensorboard`, `log=wandb` (or both, `log=tensorboard,wandb`)
sends every record to the trackers too, under the same names: a training step's metrics as they are in
metrics.jsonl (`reward_mean`, `loss`, `rollout/truncated_frac`, ...), an evaluation's under `eval/` (`eval/accuracy`,
`eval/pass@4`), each at its step. `RunFolder.append` does the mirroring, so whatever writes the logs is tracked.

- TensorBoard: event files in RUN/tb/ (`tensorboard --logdir runs/` shows every run under it).
- W&B: files in RUN/wandb/, project $WANDB_PROJECT (default "unipo"), named after the run folder. $WANDB_MODE
  decides the mode; unset, a run is online only when an API key is configured and the W&B server answers, and
  offline otherwise (`wandb sync RUN/wandb/offline-run-*` uploads it later). A resumed run continues the same W&B
  run (its id is kept in RUN/wandb/unipo-run-id).
"""

from __future__ import annotations

import importlib.util
import math
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# the package each tracker needs (the `track` extra installs both)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
WANDB_ID_FILE = "unipo-run-id"


def check_installed(log: Iterable[str]) -> None:
    """One ValueError line for the first tracker in `log` whose package is missing (checked before a model loads)."""
    for name in log:
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ValueError(f"log={name} needs the {package} package, which is not installed: "
                             f"pip install 'unipo[track]' (or pip install {package})")


def scalars(name: str, record: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {metric: value}) of one log record: numbers only (null, i.e. non-finite, and lists are left out),
    eval.jsonl's metrics under `eval/`."""
    prefix = "eval/" if name == "eval.jsonl" else ""
    values = {f"{prefix}{key}": float(value) for key, value in record.items()
              if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
    return int(record.get("step", 0)), values


class Trackers:
    """The trackers a run logs to besides its jsonl files. `log(name, record)` is called by `RunFolder.append`."""

    def __init__(self, run_dir: str | os.PathLike, log: Iterable[str], config: Mapping[str, Any] | None = None,
                 *, resume_step: int | None = None) -> None:
        self.path = Path(run_dir)
        log = tuple(log)
        check_installed(log)
        self.tensorboard = self.wandb = None
        if "tensorboard" in log:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events it logged after its checkpoint (they are logged again)
            self.tensorboard = SummaryWriter(log_dir=str(self.path / "tb"),
                                             purge_step=None if resume_step is None else resume_step + 1)
        if "wandb" in log:
            self.wandb = _wandb_run(self.path, dict(config or {}))

    def log(self, name: str, record: Mapping[str, Any]) -> None:
        step, values = scalars(name, record)
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, global_step=step)
            self.tensorboard.flush()  # a live view (and a killed run) sees every step
        if self.wandb is not None and values:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            run, self.wandb = self.wandb, None
            run.finish()


def wandb_mode() -> str:
    """$WANDB_MODE if set; else online when an API key is configured and the server answers, else offline."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if _wandb_key() and _reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")) \
        else "offline"


def _wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(url: str, timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def _wandb_run(run_dir: Path, config: dict[str, Any]):
    import wandb

    id_file = run_dir / "wandb" / WANDB_ID_FILE
    id_file.parent.mkdir(parents=True, exist_ok=True)
    if not id_file.is_file():
        id_file.write_text(secrets.token_hex(6) + "\n")  # one W&B run per run folder, resumes included
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "unipo"), name=run_dir.resolve().name,
                      dir=str(run_dir), id=id_file.read_text().strip(), resume="allow", config=config,
                      mode=wandb_mode(), reinit="create_new", settings=wandb.Settings(quiet=True))


# -- unipo watch ---------------------------------------------------------------------------------------------
# shown first, in this order; every other logged metric follows alphabetically
KEY_METRICS = ("reward_mean", "accuracy", "loss", "kl", "entropy", "clip_frac", "response_len_mean", "grad_norm",
               "lr", "step_seconds")


def watch_view(run_dir: str | os.PathLike, *, window: int = 10):
    """A rich renderable of a run folder now: what it is, how far it got, and each metric's latest value, the mean
    of the last `window` steps and its range over the run."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from unipo.runs import RunFolder

    run = RunFolder(run_dir)
    config = run.read_config()  # not a run folder: one line
    metrics, evals = run.read("metrics.jsonl"), run.read("eval.jsonl")
    step = int(metrics[-1]["step"]) if metrics else 0
    state = "training" if run.in_use() else ("finished" if step >= config.steps else "stopped")
    age = ""
    if metrics:
        seconds = time.time() - (run.path / "metrics.jsonl").stat().st_mtime
        age = f", last step {seconds:.0f} s ago"
    header = Text.assemble((f"{run.path}", "bold"), f"\n{config.recipe.name} on {config.task}, model {config.model}"
                           f"\nstep {step}/{config.steps} ({state}{age})")
    table = Table(show_edge=False, pad_edge=False)
    for column in ("metric", "latest", f"mean of last {window}", "min", "max"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    series: dict[str, list[float]] = {}
    for record in metrics:
        for key, value in scalars("metrics.jsonl", record)[1].items():
            series.setdefault(key, []).append(value)
    order = [k for k in KEY_METRICS if k in series] + sorted(k for k in series if k not in KEY_METRICS)
    for key in order:
        values = [v for v in series[key] if math.isfinite(v)]
        if values:
            recent = values[-window:]
            table.add_row(key, _fmt(values[-1]), _fmt(sum(recent) / len(recent)), _fmt(min(values)),
                          _fmt(max(values)))
    if evals:
        last_step, last = scalars("eval.jsonl", evals[-1])
        first = scalars("eval.jsonl", evals[0])[1]
        table.add_section()
        for key, value in last.items():
            table.add_row(f"{key} (step {last_step})", _fmt(value), "", "", "")
        if len(evals) > 1 and "eval/accuracy" in first and "eval/accuracy" in last:
            header.append(f"\nheld-out accuracy {first['eval/accuracy']:.3f} at step {int(evals[0]['step'])} -> "
                          f"{last['eval/accuracy']:.3f} at step {last_step}")
    if not metrics:
        return Group(header, Text("no steps logged yet"))
    return Group(header, table)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def watch(run_dir: str | os.PathLike, *, once: bool = False, interval: float = 2.0) -> None:
    """Print `watch_view` once, or refresh it every `interval` seconds until the run has finished (Ctrl-C stops)."""
    from rich.console import Console
    from rich.live import Live

    from unipo.runs import RunFolder

    console = Console()
    if once:
        console.print(watch_view(run_dir))
        return
    run = RunFolder(run_dir)
    with Live(watch_view(run_dir), console=console, refresh_per_second=4, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            live.update(watch_view(run_dir), refresh=True)
            metrics = run.read("metrics.jsonl")
            if not run.in_use() and metrics and int(metrics[-1]["step"]) >= run.read_config().steps:
                break
