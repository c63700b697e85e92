"""Moved to :mod:`gdn_dump.read.figures`; this path is kept because the 0.1 README showed it
(``gdn_dump.figures.half_life_grid`` and the other figure data)."""

from .read.figures import *  # noqa: F401,F403
from .read.figures import (  # noqa: F401
    attention_data, beta_grid, distributions, half_life_grid, norm_profile, quantile_grid,
)
