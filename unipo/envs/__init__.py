"""Multi-turn environments and tools (issue 14): the protocol (`unipo.envs.base`), tools run in the reward
sandbox (`unipo.envs.tools`), the built-in environments (`unipo.envs.games`) and gymnasium's environments as text
(`unipo.envs.gymnasium_text`, an optional dependency)."""

from unipo.envs import (
    games,  # noqa: F401  (registers guess_number and calculator)
    gymnasium_text,  # noqa: F401  (registers frozen_lake; gymnasium is imported on use)
)
from unipo.envs.base import ENVIRONMENTS, Environment, get_env

__all__ = ["ENVIRONMENTS", "Environment", "get_env"]
