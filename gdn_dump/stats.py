"""Moved to :mod:`gdn_dump.ops.stats`; this path is kept because the 0.1 README showed it
(``from gdn_dump.stats import histogram_median``)."""

from .ops.stats import *  # noqa: F401,F403
from .ops.stats import histogram_median  # noqa: F401
