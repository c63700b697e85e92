"""Per-head statistics of the stored arrays, computed while writing (issue 7).

For every per-token hook array the sink accumulates, per head and in float64, over exactly the rows
it hands to the writer: ``count`` (finite values), ``mean``, ``std`` (population, ``ddof=0``),
``mean_l2`` (mean over tokens of the head vector's L2 norm), ``min``, ``max`` and ``nonfinite``
(NaN/inf values, left out of everything else; a token whose head vector holds one is left out of
``mean_l2``). ``hook_log_decay`` also gets a histogram of the per-token half-life ``ln(0.5)/g``
in tokens, ``hook_beta`` one of its values; both on fixed edges, so merging is a sum.

Heads: when the first trailing dimension is a head dimension (``k_head``, ``v_head``, ...), each
head is one row of the statistics (``[n, H]``: over tokens; ``[n, H, d]``: over tokens and ``d``;
L2 over ``d``); otherwise the whole trailing vector is one head (``[n, d_model]``: L2 over
``d_model``).

Moments stream as in Chan et al.: each block of rows gives its own count, mean and centred sum of
squares (one float64 conversion, vectorised over heads), merged into the running ones. Regions of
a run and resumed runs merge the same way (:meth:`ArrayStats.merge`); :func:`gdn_dump.ops.stats_reference.reference_stats` is the plain
reference over a whole array that the accumulator must equal.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from ..catalogue import ROW_ARRAYS

HEAD_DIMS = ("k_head", "v_head", "attn_head", "kv_head", "attn_q_gate_head")
LN_HALF = math.log(0.5)
HALF_LIFE_EDGES = np.logspace(-2, 7, 91)  # tokens, 10 bins per decade
BETA_EDGES = np.linspace(0.0, 1.0, 21)
HISTOGRAMS = {"half_life": HALF_LIFE_EDGES, "beta": BETA_EDGES}
BLOCK_ELEMENTS = 1 << 18  # values converted to float64 at once (2 MiB): stays in cache
VERSION = 1


def histogram_kind(name: str) -> str | None:
    if name.endswith("hook_log_decay"):
        return "half_life"
    if name.endswith("hook_beta"):
        return "beta"
    return None


def wants_stats(name: str, dims: Iterable[str]) -> bool:
    """Per-token hook arrays: not ``tokens``, the prompt index or the attention matrices."""
    dims = tuple(dims)
    return bool(dims) and dims[0] == "token" and name not in ROW_ARRAYS


def head_layout(dims: Iterable[str], shape: Iterable[int]) -> tuple[str | None, int, int]:
    """``(heads_dim, H, width)`` of an array ``[n, *shape]`` with dimension names ``dims``
    (``dims`` may include the leading ``token``)."""
    dims, shape = list(dims), list(shape)
    if len(dims) == len(shape) + 1:
        dims = dims[1:]
    width = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if dims and dims[0] in HEAD_DIMS:
        return dims[0], int(shape[0]), width // max(int(shape[0]), 1)
    return None, 1, width


def _half_life(g: np.ndarray) -> np.ndarray:
    """``ln(0.5) / g`` for finite ``g < 0``; ``inf`` (never halves) for ``g >= 0``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = LN_HALF / g
    out[~(g < 0)] = np.inf
    return out


def _guess(kind: str, values: np.ndarray) -> np.ndarray:
    """About the bin index of each value (float, maybe off by one): arithmetic on the edges'
    spacing, corrected exactly in :func:`_bin`."""
    if kind == "half_life":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log10(values) * 10.0 + 20.0
    return values * 20.0


# categories: 0 below edges[0], i + 1 for bin i, len(edges) above; _PADDED[c] <= v < _PADDED[c + 1]
# (the NaN past the end compares false: nothing moves above "above")
_PADDED = {kind: np.concatenate([[-np.inf], edges, [np.nan]]) for kind, edges in HISTOGRAMS.items()}


def _bin(kind: str, values: np.ndarray) -> np.ndarray:
    """Category per value, as ``np.histogram`` bins (half-open, the last one closed): 0 below
    ``edges[0]``, ``i + 1`` for bin ``i``, ``len(edges)`` above; ``values`` holds no NaN."""
    edges, padded = HISTOGRAMS[kind], _PADDED[kind]
    top = len(edges)
    # off by at most one: the guess is the exact index up to rounding (truncation = floor, >= -1)
    guess = np.fmax(_guess(kind, values), -1.0)  # fmax/fmin: NaN (log of <= 0) becomes -1
    cat = np.fmin(guess, top - 1.0, out=guess).astype(np.intp)
    cat += 1
    cat -= (values < padded[cat]).view(np.int8)
    cat += (values >= padded[cat + 1]).view(np.int8)
    cat[values == edges[-1]] = top - 1
    return cat


class ArrayStats:
    """Streaming per-head statistics of one array; see the module docstring."""

    def __init__(self, heads: int, width: int, heads_dim: str | None = None,
                 histogram: str | None = None):
        self.heads, self.width, self.heads_dim, self.histogram = heads, width, heads_dim, histogram
        h = heads
        self.n = np.zeros(h, np.int64)
        self.mean = np.zeros(h)
        self.m2 = np.zeros(h)
        self.min = np.full(h, np.inf)
        self.max = np.full(h, -np.inf)
        self.nonfinite = np.zeros(h, np.int64)
        self.l2_n = np.zeros(h, np.int64)
        self.l2_sum = np.zeros(h)
        if histogram is not None and width != 1:
            raise ValueError(f"a {histogram} histogram needs one value per head, not {width}")
        self.edges = HISTOGRAMS[histogram] if histogram else None
        self.hist = np.zeros((h, len(self.edges) + 1), np.int64) if histogram else None

    @classmethod
    def for_array(cls, name: str, dims, shape) -> ArrayStats:
        """For an array ``name`` with trailing ``shape`` (no token axis) and dimension names."""
        heads_dim, heads, width = head_layout(dims, shape)
        kind = histogram_kind(name)
        return cls(heads, width, heads_dim, kind if width == 1 else None)

    # --- streaming -------------------------------------------------------------------------

    def accumulate(self, rows: np.ndarray) -> None:
        """Add rows ``[n, ...]`` (any float dtype), converted to float64 a block at a time."""
        rows = np.asarray(rows)
        n = rows.shape[0]
        if n == 0:
            return
        flat = rows.reshape(n, self.heads, self.width)
        step = max(1, BLOCK_ELEMENTS // max(self.heads * self.width, 1))
        for lo in range(0, n, step):
            self._block(flat[lo:lo + step].astype(np.float64))

    def _block(self, v: np.ndarray) -> None:
        n, h, d = v.shape
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: the slow path below
            total = v.sum(axis=(0, 2))
        if np.isfinite(total).all():  # every value finite (a float64 sum of finite values is)
            count = np.full(h, n * d, np.int64)
            mean = total / (n * d)
            self._minmax(v.min(axis=(0, 2)), v.max(axis=(0, 2)))
            sq = np.einsum("thd,thd->th", v, v) if d > 1 else np.square(v[:, :, 0])
            self.l2_sum += np.sqrt(sq).sum(axis=0)
            self.l2_n += n
            if self.hist is not None:
                self._histogram(v[:, :, 0], None)
            v -= mean[None, :, None]
            m2 = np.einsum("thd,thd->h", v, v)
        else:
            fin = np.isfinite(v)
            count = fin.sum(axis=(0, 2))
            self.nonfinite += n * d - count
            z = np.where(fin, v, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(count > 0, z.sum(axis=(0, 2)) / np.maximum(count, 1), 0.0)
            self._minmax(np.where(fin, v, np.inf).min(axis=(0, 2)),
                         np.where(fin, v, -np.inf).max(axis=(0, 2)))
            whole = fin.all(axis=2)
            norms = np.sqrt(np.einsum("thd,thd->th", z, z))
            self.l2_sum += np.where(whole, norms, 0.0).sum(axis=0)
            self.l2_n += whole.sum(axis=0)
            c = np.where(fin, v - mean[None, :, None], 0.0)
            m2 = np.einsum("thd,thd->h", c, c)
            if self.hist is not None:
                self._histogram(v[:, :, 0], fin[:, :, 0])
        self._merge_moments(count, mean, m2)

    def _minmax(self, lo: np.ndarray, hi: np.ndarray) -> None:
        np.minimum(self.min, lo, out=self.min)
        np.maximum(self.max, hi, out=self.max)

    def _histogram(self, x: np.ndarray, finite: np.ndarray | None) -> None:
        """``x`` [n, H] float64 values; ``finite`` masks the ones to count (None: all)."""
        if finite is not None:
            x = np.where(finite, x, 0.0)
        values = _half_life(x) if self.histogram == "half_life" else x
        cat = _bin(self.histogram, values)
        width = self.hist.shape[1]
        idx = cat + np.arange(self.heads)[None, :] * width
        if finite is not None:
            idx = idx[finite]
        self.hist += np.bincount(idx.ravel(), minlength=self.heads * width).reshape(self.heads, width)

    def _merge_moments(self, nb: np.ndarray, mb: np.ndarray, m2b: np.ndarray) -> None:
        na = self.n
        n = na + nb
        safe = np.maximum(n, 1)
        delta = mb - self.mean
        self.mean = np.where(n > 0, self.mean + delta * (nb / safe), 0.0)
        self.m2 = self.m2 + m2b + delta * delta * (na * (nb / safe))
        self.n = n

    def merge(self, other: ArrayStats) -> ArrayStats:
        """Add ``other`` (the statistics of other rows of the same array) into this one."""
        if (other.heads, other.width, other.histogram) != (self.heads, self.width, self.histogram):
            raise ValueError("statistics of different arrays cannot be merged")
        self._merge_moments(other.n, other.mean, other.m2)
        self._minmax(other.min, other.max)
        self.nonfinite += other.nonfinite
        self.l2_n += other.l2_n
        self.l2_sum += other.l2_sum
        if self.hist is not None:
            self.hist += other.hist
        return self

    def copy(self) -> ArrayStats:
        out = ArrayStats.__new__(ArrayStats)
        out.__dict__.update({k: v.copy() if isinstance(v, np.ndarray) and k != "edges" else v
                             for k, v in self.__dict__.items()})
        return out

    # --- (de)serialisation, results ------------------------------------------------------------

    def to_json(self) -> dict:
        """The exact state (floats round-trip through JSON); empty heads' min/max are null."""
        out = {
            "version": VERSION, "heads_dim": self.heads_dim, "heads": self.heads,
            "width": self.width, "histogram": self.histogram,
            "n": self.n.tolist(), "mean": self.mean.tolist(), "m2": self.m2.tolist(),
            "min": _nullable(self.min), "max": _nullable(self.max),
            "nonfinite": self.nonfinite.tolist(), "l2_n": self.l2_n.tolist(),
            "l2_sum": self.l2_sum.tolist(),
        }
        if self.hist is not None:
            out["hist"] = self.hist.tolist()
        return out

    @classmethod
    def from_json(cls, state: dict) -> ArrayStats:
        if state.get("version") != VERSION:
            raise ValueError(f"unknown statistics version {state.get('version')!r}")
        out = cls(int(state["heads"]), int(state["width"]), state.get("heads_dim"),
                  state.get("histogram"))
        out.n = np.asarray(state["n"], np.int64)
        out.mean = np.asarray(state["mean"], np.float64)
        out.m2 = np.asarray(state["m2"], np.float64)
        out.min = np.array([np.inf if x is None else x for x in state["min"]], np.float64)
        out.max = np.array([-np.inf if x is None else x for x in state["max"]], np.float64)
        out.nonfinite = np.asarray(state["nonfinite"], np.int64)
        out.l2_n = np.asarray(state["l2_n"], np.int64)
        out.l2_sum = np.asarray(state["l2_sum"], np.float64)
        if out.hist is not None:
            out.hist = np.asarray(state["hist"], np.int64).reshape(out.hist.shape)
        return out

    def result(self) -> dict:
        """Per-head lists (the array attribute ``stats``); empty heads give null values."""
        empty = self.n == 0
        with np.errstate(invalid="ignore", divide="ignore"):
            std = np.sqrt(np.maximum(self.m2, 0.0) / np.maximum(self.n, 1))
            l2 = self.l2_sum / np.maximum(self.l2_n, 1)
        out = {
            "heads_dim": self.heads_dim,
            "count": self.n.tolist(),
            "nonfinite": self.nonfinite.tolist(),
            "mean": _nullable(self.mean, empty),
            "std": _nullable(std, empty),
            "mean_l2": _nullable(l2, self.l2_n == 0),
            "min": _nullable(self.min, empty),
            "max": _nullable(self.max, empty),
        }
        if self.hist is not None:
            out[f"{self.histogram}_histogram"] = {
                "edges": self.edges.tolist(),
                "counts": self.hist[:, 1:-1].tolist(),
                "below": self.hist[:, 0].tolist(),
                "above": self.hist[:, -1].tolist(),
            }
        return out

    def summary(self) -> dict:
        """All heads together: count, mean, std, min, max (the group provenance's ``stats``)."""
        n = int(self.n.sum())
        if n == 0:
            return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
        mean = float((self.mean * self.n).sum() / n)
        m2 = float((self.m2 + self.n * (self.mean - mean) ** 2).sum())
        return {"count": n, "mean": mean, "std": math.sqrt(max(m2, 0.0) / n),
                "min": float(self.min.min()), "max": float(self.max.max())}


def _nullable(values: np.ndarray, empty: np.ndarray | None = None) -> list:
    empty = ~np.isfinite(values) if empty is None else empty | ~np.isfinite(values)
    return [None if e else float(v) for v, e in zip(values.tolist(), empty.tolist())]


# --- a run's statistics: name -> ArrayStats ----------------------------------------------------

# Per head, over the snapshots of a state array: its Frobenius norm and effective rank (exp of the
# entropy of the normalised singular values); accumulated under "<array>:<statistic>".
STATE_STATISTICS = ("norm", "effective_rank")


def state_stat_key(name: str, statistic: str) -> str:
    return f"{name}:{statistic}"


def split_stat_key(key: str) -> tuple[str, str | None]:
    """``(array name, state statistic or None)`` of a key of :func:`for_arrays`."""
    name, _, statistic = key.partition(":")
    return name, statistic or None


def for_arrays(specs) -> dict[str, ArrayStats]:
    """Fresh accumulators for the plan's per-token hook arrays (``ArraySpec``s), and for the
    per-snapshot statistics of its state arrays (``[n, v_head]`` each)."""
    out = {a.name: ArrayStats.for_array(a.name, a.dims, a.shape[1:]) for a in specs
           if a.stream == "token" and wants_stats(a.name, a.dims)}
    for a in specs:
        if a.stream == "state":
            for statistic in STATE_STATISTICS:
                out[state_stat_key(a.name, statistic)] = ArrayStats(a.shape[1], 1, a.dims[1])
    return out


def to_json(stats: dict[str, ArrayStats]) -> dict:
    return {name: s.to_json() for name, s in stats.items()}


def from_json(state: dict) -> dict[str, ArrayStats]:
    return {name: ArrayStats.from_json(s) for name, s in state.items()}


def snapshot(stats: dict[str, ArrayStats]) -> dict[str, ArrayStats]:
    return {name: s.copy() for name, s in stats.items()}


def merged(states: Iterable[dict]) -> dict[str, ArrayStats]:
    """Merge several runs' JSON states (regions of one store), array by array."""
    total: dict[str, ArrayStats] = {}
    for state in states:
        for name, s in from_json(state).items():
            if name in total:
                total[name].merge(s)
            else:
                total[name] = s
    return total


def histogram_median(hist: dict) -> list[float | None]:
    """Per head, the median of a histogram (``below``/``counts``/``above`` on ``edges``),
    interpolated log-linearly inside its bin (linearly when an edge is 0); ``-inf``/``inf``
    when it lies below or above the edges, None for an empty head."""
    edges = np.asarray(hist["edges"], np.float64)
    out: list[float | None] = []
    for below, counts, above in zip(hist["below"], hist["counts"], hist["above"]):
        total = below + sum(counts) + above
        if total == 0:
            out.append(None)
            continue
        half = total / 2
        if below >= half:
            out.append(-math.inf)
            continue
        seen = below
        for i, c in enumerate(counts):
            if c and seen + c >= half:
                frac = (half - seen) / c
                lo, hi = edges[i], edges[i + 1]
                out.append(float(lo * (hi / lo) ** frac) if lo > 0 else float(lo + (hi - lo) * frac))
                break
            seen += c
        else:
            out.append(math.inf)
    return out
