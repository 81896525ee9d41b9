"""Learning curves people read: one grid of panels per run, and one overlaying several runs.

Panels (each drawn only when the run logged its metric; a missing one is named in a note, never drawn empty):
reward, held-out accuracy (eval.jsonl, greedy, step 0 included when it was evaluated), loss (and the SFT loss of
mixed recipes), KL (to the reference, and between the sampling and the updated policy), entropy, clip fraction,
response length. Per-step values are drawn faint under a trailing mean; an overlay draws the means only, one
colour per run, and names the runs in its legend. The last free cell of the grid holds a summary of the run(s).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unipo.runs import RunFolder

PNG = "curves.png"  # a run's own plot, inside its folder


@dataclass(frozen=True)
class Panel:
    title: str
    lines: tuple[tuple[str, str], ...]  # (metric, label), drawn in this order
    source: str = "metrics.jsonl"
    ylabel: str = ""


PANELS = (
    Panel("reward", (("reward_mean", "train rollouts"),), ylabel="mean reward"),
    Panel("held-out accuracy", (("accuracy", "greedy"),), source="eval.jsonl", ylabel="accuracy"),
    Panel("loss", (("loss", "total"), ("sft_loss", "SFT term"))),
    Panel("KL", (("kl", "to the reference"), ("actor/approx_kl", "old -> new policy")), ylabel="nats"),
    Panel("entropy", (("entropy", "policy"),), ylabel="nats / token"),
    Panel("clip fraction", (("clip_frac", "clipped tokens"),), ylabel="fraction of tokens"),
    Panel("response length", (("response_len_mean", "train rollouts"),), ylabel="tokens"),
)
COLUMNS = 4
STYLES = ("-", "--", ":")


@dataclass
class _Run:
    name: str
    folder: RunFolder
    logs: dict[str, list[dict]]
    config: object | None  # TrainConfig, or None when config.yaml cannot be read

    def series(self, source: str, key: str) -> tuple[list[float], list[float]] | None:
        """(steps, values) of `key`, None when no record has it (null, i.e. non-finite, counts: it is a gap)."""
        if key == "kl" and self.config is not None and not self.config.recipe.needs_reference:
            return None  # logged as 0 by recipes without a reference model: nothing to draw
        records = [r for r in self.logs[source] if key in r]
        if not records:
            return None
        return ([float(r["step"]) for r in records],
                [math.nan if r[key] is None else float(r[key]) for r in records])


def load(run_dir: str | os.PathLike) -> _Run:
    folder = RunFolder(run_dir)
    logs = {name: folder.read(name) for name in ("metrics.jsonl", "eval.jsonl")}
    if not logs["metrics.jsonl"] and not logs["eval.jsonl"]:
        raise ValueError(f"{run_dir} has no metrics.jsonl records to plot")
    try:
        config = folder.read_config()
    except ValueError:
        config = None
    return _Run(folder.path.resolve().name, folder, logs, config)


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, smooth: int | None = None,
             notes: list[str] | None = None) -> Path:
    """A run's panels as one PNG (default RUN/curves.png); a note per metric the run did not log goes to `notes`."""
    run = load(run_dir)
    out = Path(out) if out else run.folder.path / PNG
    _draw([run], out, smooth, notes if notes is not None else [])
    return out


def plot_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
              smooth: int | None = None, notes: list[str] | None = None) -> list[Path]:
    """Each run's own PNG (RUN/curves.png) and, for several runs, one PNG overlaying them all (`out`, default
    next to the runs, named after them). For a single run `out` is its PNG. Returns the PNGs written."""
    if not run_dirs:
        raise ValueError("name at least one run folder to plot")
    notes = notes if notes is not None else []
    runs = [load(path) for path in run_dirs]
    names = [run.name for run in runs]
    if len(set(names)) < len(names):  # same folder name in different places: name them by their parent too
        for run in runs:
            run.name = f"{run.folder.path.resolve().parent.name}/{run.name}"
    if len(runs) == 1:
        written = [Path(out) if out else runs[0].folder.path / PNG]
        _draw(runs, written[0], smooth, notes)
        return written
    written = []
    for run in runs:
        written.append(run.folder.path / PNG)
        _draw([run], written[-1], smooth, notes)
    if out is None:
        parents = [str(run.folder.path.resolve()) for run in runs]
        common = Path(os.path.commonpath(parents))
        common = common.parent if str(common) in parents else common
        stem = "-vs-".join(name.replace("/", "_") for name in names)
        out = common / f"curves-{stem[:120]}.png"
    written.append(Path(out))
    _draw(runs, written[-1], smooth, [])  # each run's notes were given above
    return written


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values, skipping NaNs (steps without rollouts)."""
    out = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1):i + 1] if v == v]
        out.append(sum(recent) / len(recent) if recent else float("nan"))
    return out


def _window(steps: int, smooth: int | None) -> int:
    # ~a tenth of the run: 20 steps -> 2, 250 -> 25 (capped)
    return max(1, smooth if smooth is not None else min(25, round(steps / 10)))


def _draw(runs: list[_Run], out: Path, smooth: int | None, notes: list[str]) -> None:
    import matplotlib.pyplot as plt

    fig = figure(runs, smooth, notes)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def figure(runs: list[_Run], smooth: int | None = None, notes: list[str] | None = None):
    """The matplotlib figure of `runs` (loaded with `load`): one run's panels, or several runs overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    notes = notes if notes is not None else []
    overlay = len(runs) > 1
    present = []
    for panel in PANELS:
        found = [(key, label) for key, label in panel.lines if any(r.series(panel.source, key) for r in runs)]
        for run in runs:
            if not any(run.series(panel.source, key) for key, _ in panel.lines):
                keys = " or ".join(key for key, _ in panel.lines)
                notes.append(f"{run.name}: no {panel.title} panel ({keys} not in {panel.source})")
        if found:
            present.append((panel, found))
    cells = len(present) + 1  # + the summary
    rows = math.ceil(cells / COLUMNS)
    columns = min(COLUMNS, cells)
    fig, axes = plt.subplots(rows, columns, figsize=(4.3 * columns, 3.2 * rows + (0.5 if overlay else 0.3)),
                             squeeze=False)
    flat = list(axes.flat)
    last_step = max((float(r["step"]) for run in runs for logs in run.logs.values() for r in logs), default=1.0)
    steps_logged = max(len(run.logs["metrics.jsonl"]) for run in runs)
    window = _window(steps_logged, smooth)
    for ax, (panel, found) in zip(flat, present):
        for index, run in enumerate(runs):
            for number, (key, label) in enumerate(found):
                series = run.series(panel.source, key)
                if series is None:
                    continue
                steps, values = series
                color = f"C{index}" if overlay else f"C{number}"
                style = STYLES[number % len(STYLES)] if overlay else "-"
                name = None if overlay else label
                if panel.source == "eval.jsonl":
                    ax.plot(steps, values, marker="o", markersize=4, linestyle=style, color=color, label=name)
                    continue
                if window > 1 and not overlay:
                    ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
                ax.plot(steps, moving_average(values, window), color=color, linestyle=style, linewidth=1.8,
                        label=name)
        ax.set_title(panel.title, fontsize=11)
        ax.set_xlabel("step", fontsize=9)
        if panel.ylabel:
            ax.set_ylabel(panel.ylabel, fontsize=9)
        ax.set_xlim(0, max(last_step, 1))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if panel.title in ("held-out accuracy", "clip fraction"):
            ax.set_ylim(-0.03, 1.03)
        if len(panel.lines) > 1:  # say which of the panel's metrics these are, even when one is missing
            handles = [Line2D([], [], color="0.35" if overlay else f"C{n}", linestyle=STYLES[n % len(STYLES)]
                              if overlay else "-", label=label) for n, (_, label) in enumerate(found)]
            ax.legend(handles=handles, fontsize=7, loc="best")
    summary = flat[len(present)]
    summary.axis("off")
    summary.text(0.02, 0.98, _summary(runs), transform=summary.transAxes, va="top", ha="left", fontsize=8.5,
                 family="monospace")
    for ax in flat[len(present) + 1:]:
        ax.remove()
    smoothing = f"faint: each step; solid: mean of the last {window} steps" if window > 1 else "each step"
    if overlay:
        handles = [Line2D([], [], color=f"C{i}", linewidth=2.5, label=run.name) for i, run in enumerate(runs)]
        fig.legend(handles=handles, loc="upper center", ncol=min(len(runs), 4), fontsize=9, frameon=False)
        smoothing = f"mean of the last {window} steps" if window > 1 else "each step"
        fig.text(0.99, 0.005, f"training curves: {smoothing}; held-out: greedy accuracy", ha="right",
                 fontsize=7.5, color="0.4")
        fig.tight_layout(rect=(0, 0.02, 1, 1 - 0.45 / fig.get_figheight()))
    else:
        fig.suptitle(runs[0].name, fontsize=12)
        fig.text(0.99, 0.005, f"training curves: {smoothing}; held-out: greedy accuracy", ha="right",
                 fontsize=7.5, color="0.4")
        fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


def _summary(runs: list[_Run]) -> str:
    """The summary cell: what each run is, how long it trained, its held-out accuracy first and last."""
    lines = []
    for run in runs:
        config = run.config
        metrics, evals = run.logs["metrics.jsonl"], run.logs["eval.jsonl"]
        lines.append(run.name if len(runs) > 1 else "run")
        if config is not None:
            lines.append(f"  {config.recipe.name} on {config.task}")
            lines.append(f"  model {_short(config.model)}, seed {config.seed}")
        step = int(metrics[-1]["step"]) if metrics else 0
        total = f" of {config.steps}" if config is not None else ""
        lines.append(f"  {step}{total} steps")
        accuracies = [(int(e["step"]), e["accuracy"]) for e in evals if e.get("accuracy") is not None]
        if accuracies:
            (s0, a0), (s1, a1) = accuracies[0], accuracies[-1]
            lines.append(f"  held-out {a0:.3f} (step {s0})" + (f" -> {a1:.3f} (step {s1})" if s1 != s0 else ""))
        rewards = [m["reward_mean"] for m in metrics[-10:] if m.get("reward_mean") is not None]
        if rewards:
            lines.append(f"  reward {sum(rewards) / len(rewards):.3f} (last {len(rewards)} steps)")
    return "\n".join(lines)


def _short(text: str, width: int = 28) -> str:
    """A model name that fits the summary: a long path as its last two parts."""
    if len(text) > width and "/" in text:
        text = "/".join(Path(text).parts[-2:])
    return text if len(text) <= width else "..." + text[-(width - 3):]
