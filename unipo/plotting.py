"""Learning-curve plots of a run folder (or several, for comparisons)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from unipo.runs import RunFolder

CURVES = (("reward_mean", "reward (train rollouts)"), ("accuracy", "accuracy (train rollouts)"))


def plot_run(run_dir: str | Path, out: str | Path | None = None, smooth: int = 5) -> Path:
    """reward/accuracy per step (raw and moving average) plus eval accuracy, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = RunFolder(run_dir)
    metrics, evals = run.read("metrics.jsonl"), run.read("eval.jsonl")
    if not metrics:
        raise ValueError(f"{run_dir} has no metrics.jsonl records to plot")
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6))
    steps = [m["step"] for m in metrics]
    for ax, (key, title) in zip(axes, CURVES):
        values = [m.get(key, float("nan")) for m in metrics]
        ax.plot(steps, values, alpha=0.3, color="C0", label="per step")
        ax.plot(steps, moving_average(values, smooth), color="C0", label=f"mean of {smooth}")
        if key == "accuracy" and evals:
            ax.plot([e["step"] for e in evals], [e["accuracy"] for e in evals], "o-", color="C3",
                    label="held-out (greedy)")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out) if out else run.path / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
