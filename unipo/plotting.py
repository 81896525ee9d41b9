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
        values = [float("nan") if m.get(key) is None else m[key] for m in metrics]
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
    """Trailing mean over up to `window` values, skipping NaNs (steps without rollouts)."""
    out = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1):i + 1] if v == v]
        out.append(sum(recent) / len(recent) if recent else float("nan"))
    return out
