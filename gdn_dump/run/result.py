"""What :func:`gdn_dump.run.pipeline.extract` tells its caller: progress while it runs
(:class:`Reporter`) and what one process did (:class:`ExtractResult`). No torch here: the command
line subclasses the reporter and renders the result without importing the model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..store.layout import Plan
from .split import WorkSplit

if TYPE_CHECKING:
    from ..model.load import LoadedModel
    from .session import Session


class Reporter:
    """Progress callbacks; the default reports nothing (library use, ``--quiet``)."""

    def opened(self, out: str) -> None:
        """The store at ``out`` exists now (created, resumed or joined): an interruption from here
        on leaves it ``in_progress``, to continue with ``--resume``."""

    def start(self, n_prompts: int, n_tokens: int) -> None: ...
    def advance(self, prompts: int, tokens: int, bytes_written: int) -> None: ...
    def note(self, message: str) -> None: ...
    def finish(self) -> None: ...


@dataclass
class ExtractResult:
    """What one process did. ``prompts``, ``tokens`` and ``seconds`` are this run's work; the
    counts (``overflow``, ``nonfinite``, ``residuals``, ``oom_retries``, ``padding``) are the
    region's, over every run that wrote it (what its progress record says)."""

    plan: Plan
    out: str
    split: WorkSplit
    seconds: float = 0.0
    tokens: int = 0
    prompts: int = 0
    bytes_written: int = 0
    overflow: dict[str, int] = field(default_factory=dict)  # finite values cast to inf, per array
    nonfinite: dict[str, int] = field(default_factory=dict)  # NaN/inf from the model, per array
    residuals: dict[str, list[float]] = field(default_factory=dict)  # matrix -> [max, sum, n]
    oom_retries: int = 0
    replaced_lines: int = 0  # prompt lines with invalid UTF-8 read with U+FFFD (--encoding-errors)
    padding: float = 0.0  # share of padded positions in the batches run
    peak_held_bytes: int = 0  # rows held for reordering, at most
    peak_rss: int = 0
    model: LoadedModel | None = None
    session: Session | None = None
    status: str = "in_progress"  # of the whole store once this process is done
    pending_regions: list[int] = field(default_factory=list)  # regions other processes still run
    memory: list = field(default_factory=list)  # dry run: a memory.MemoryEstimate per prompt length
