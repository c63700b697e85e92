"""What a region's rows took to make: the counts a progress record carries.

The run fills one :class:`Tally` per process as rows reach the store (the sink thread owns it:
nothing else writes it). It is snapshotted at every unit end together with the statistics, and a
progress record (:mod:`gdn_dump.store.ledger`) carries the snapshot of the unit boundary it
records; ``--resume`` starts from that snapshot, and finalize sums the regions' tallies. So a
killed and resumed run records exactly the counts of an uninterrupted one.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field


@dataclass
class Tally:
    prompts: int = 0  # prompts handed on, with those without tokens
    tokens: int = 0  # token rows
    padded_tokens: int = 0  # positions of the padded batches that ran them
    overflow: dict[str, int] = field(default_factory=dict)  # finite values cast to inf, per array
    nonfinite: dict[str, int] = field(default_factory=dict)  # NaN/inf from the model, per array
    residuals: dict[str, list[float]] = field(default_factory=dict)  # matrix -> [max, sum, count]
    oom_retries: int = 0
    seconds: float = 0.0  # time spent, over every run of the region, up to the snapshot

    @property
    def padding(self) -> float:
        """Share of padded positions in the batches run."""
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    def add_counts(self, kind: dict[str, int], counts: dict[str, int]) -> None:
        for name, count in counts.items():
            kind[name] = kind.get(name, 0) + count

    def add_residuals(self, name: str, values: list[float]) -> None:
        worst, total, n = self.residuals.get(name, [0.0, 0.0, 0])
        self.residuals[name] = [max([worst, *values]), total + sum(values), n + len(values)]

    def snapshot(self) -> Tally:
        return copy.deepcopy(self)

    def minus(self, earlier: Tally) -> Tally:
        """What was done since ``earlier`` (prompts, tokens, time: this run's share)."""
        return Tally(self.prompts - earlier.prompts, self.tokens - earlier.tokens,
                     self.padded_tokens - earlier.padded_tokens,
                     seconds=self.seconds - earlier.seconds)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, state: dict | None) -> Tally:
        """A record's tally; a record without one (older runs) gives an empty tally."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in (state or {}).items() if k in known})


def summed(tallies: list[Tally]) -> Tally:
    """The regions' tallies as one: counts summed, the time of the slowest region."""
    total = Tally()
    for t in tallies:
        total.prompts += t.prompts
        total.tokens += t.tokens
        total.padded_tokens += t.padded_tokens
        total.add_counts(total.overflow, t.overflow)
        total.add_counts(total.nonfinite, t.nonfinite)
        for name, (worst, s, n) in t.residuals.items():
            w0, s0, n0 = total.residuals.get(name, [0.0, 0.0, 0])
            total.residuals[name] = [max(w0, worst), s0 + s, n0 + n]
        total.oom_retries += t.oom_retries
        total.seconds = max(total.seconds, t.seconds)
    return total
