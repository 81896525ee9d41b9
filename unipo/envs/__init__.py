"""Multi-turn environments and tools (issue 14): the protocol (`unipo.envs.base`), tools run in the reward
sandbox (`unipo.envs.tools`) and the built-in environments (`unipo.envs.games`)."""

from unipo.envs import games  # noqa: F401  (registers guess_number and calculator)
from unipo.envs.base import ENVIRONMENTS, Environment, get_env

__all__ = ["ENVIRONMENTS", "Environment", "get_env"]
