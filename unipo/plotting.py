"""Kept for imports of the old name: the plots live in `unipo.plots`."""

from unipo.plots import moving_average, plot_run, plot_runs  # noqa: F401
