"""Per-batch statistics computed where the rows are, on the GPU, before they are copied to the host.

The host accumulator (:class:`gdn_dump.stats.ArrayStats`) converts every stored value to float64 on
one CPU core, about 0.6 GB/s: on a GPU node, where extraction moves several GB/s, that would be the
limit. Here each hook's rows ``[n, ...]`` of a batch are reduced on the device, in float64, to a
small ``[H, 8 + bins]`` block of per-head moments (count, mean, centred sum of squares, min, max,
NaN/inf count, L2-norm count and sum, histogram), copied to the host with the rows and merged there
with :meth:`ArrayStats.merge_packed`. Same definitions as the host path and :func:`gdn_dump.ops.stats_reference.reference_stats`
(masked NaN/inf, half-open histogram bins with the last one closed); tests hold them together.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .stats import HISTOGRAMS, LN_HALF, ArrayStats

COUNT, MEAN, M2, MIN, MAX, NONFINITE, L2_N, L2_SUM = range(8)
FIELDS = 8

_EDGES: dict[tuple[str, torch.device], torch.Tensor] = {}


def batch_stats(rows: torch.Tensor, template: ArrayStats) -> torch.Tensor:
    """``rows`` ``[n, ...]`` (stored values, any float dtype) -> float64 ``[H, FIELDS (+ bins)]``
    per-head moments for ``template``'s layout (heads, width, histogram). No host sync."""
    n = rows.shape[0]
    v = rows.reshape(n, template.heads, template.width).double()
    fin = torch.isfinite(v)
    count = fin.sum((0, 2)).double()
    z = torch.where(fin, v, 0.0)
    mean = z.sum((0, 2)) / count.clamp_min(1)
    centred = torch.where(fin, v - mean[None, :, None], 0.0)
    whole = fin.all(2)
    norms = z.square().sum(2).sqrt()
    fields = [
        count, mean, centred.square().sum((0, 2)),
        torch.where(fin, v, math.inf).amin((0, 2)), torch.where(fin, v, -math.inf).amax((0, 2)),
        n * template.width - count,
        whole.sum(0).double(), torch.where(whole, norms, 0.0).sum(0),
    ]
    out = torch.stack(fields, 1)
    if template.histogram is None:
        return out
    return torch.cat([out, _histogram(v[:, :, 0], fin[:, :, 0], template)], 1)


def _histogram(x: torch.Tensor, finite: torch.Tensor, template: ArrayStats) -> torch.Tensor:
    """Counts ``[H, len(edges) + 1]``: below the first edge, each bin, above the last edge."""
    kind = template.histogram
    key = (kind, x.device)
    if key not in _EDGES:
        _EDGES[key] = torch.as_tensor(HISTOGRAMS[kind], dtype=torch.float64, device=x.device)
    edges = _EDGES[key]
    if kind == "half_life":  # ln(0.5)/g for g < 0; a g >= 0 never halves: above every edge
        # a true division (scalar / tensor is a reciprocal and a product: another rounding)
        x = torch.where(x < 0, torch.full_like(x, LN_HALF) / torch.where(x < 0, x, -1.0), math.inf)
    # right=True: edges[i-1] <= x < edges[i] -> i, so category i is bin i-1 (0: below, len: above)
    cat = torch.bucketize(x, edges, right=True)
    cat = torch.where(x == edges[-1], len(edges) - 1, cat)  # the last bin is closed
    width = len(edges) + 1
    heads = x.shape[1]
    index = cat + torch.arange(heads, device=x.device)[None, :] * width
    counts = torch.bincount(index[finite], minlength=heads * width)
    return counts.reshape(heads, width).double()


def merge_packed(stats: ArrayStats, packed: np.ndarray) -> None:
    """Merge a host copy of :func:`batch_stats` into ``stats``."""
    other = ArrayStats(stats.heads, stats.width, stats.heads_dim, stats.histogram)
    other.n = packed[:, COUNT].astype(np.int64)
    other.mean, other.m2 = packed[:, MEAN].copy(), packed[:, M2].copy()
    other.min, other.max = packed[:, MIN].copy(), packed[:, MAX].copy()
    other.nonfinite = packed[:, NONFINITE].astype(np.int64)
    other.l2_n, other.l2_sum = packed[:, L2_N].astype(np.int64), packed[:, L2_SUM].copy()
    if other.hist is not None:
        other.hist = packed[:, FIELDS:].astype(np.int64)
    stats.merge(other)
