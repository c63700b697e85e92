"""The plain reference of :mod:`gdn_dump.ops.stats`: the statistics of a whole array, head by head,
with numpy's own functions (``mean``, ``std``, ``np.histogram``). Same signature of results as
:meth:`gdn_dump.ops.stats.ArrayStats.result`; tests hold the streaming accumulator (and the device
reduction of :mod:`gdn_dump.ops.stats_device`) to it.
"""

from __future__ import annotations

import numpy as np

from .stats import HISTOGRAMS, LN_HALF, head_layout, histogram_kind


def reference_stats(x: np.ndarray, dims, name: str = "") -> dict:
    """The statistics of a whole array ``[n, ...]`` in plain numpy float64, head by head: what
    :meth:`ArrayStats.result` must give for the same rows."""
    x = np.asarray(x)
    heads_dim, heads, width = head_layout(dims, x.shape[1:])
    kind = histogram_kind(name) if width == 1 else None
    v = x.reshape(x.shape[0], heads, width).astype(np.float64)
    out = {k: [] for k in ("count", "nonfinite", "mean", "std", "mean_l2", "min", "max")}
    hist = {"edges": HISTOGRAMS[kind].tolist(), "counts": [], "below": [], "above": []} if kind else None
    for h in range(heads):
        block = v[:, h, :]
        fin = np.isfinite(block)
        values = block[fin]
        out["count"].append(int(values.size))
        out["nonfinite"].append(int((~fin).sum()))
        some = values.size > 0
        out["mean"].append(float(values.mean()) if some else None)
        out["std"].append(float(values.std()) if some else None)
        out["min"].append(float(values.min()) if some else None)
        out["max"].append(float(values.max()) if some else None)
        whole = block[fin.all(axis=1)]
        out["mean_l2"].append(float(np.linalg.norm(whole, axis=1).mean()) if len(whole) else None)
        if kind:
            edges = HISTOGRAMS[kind]
            data = values
            if kind == "half_life":
                data = np.full(values.shape, np.inf)
                data[values < 0] = LN_HALF / values[values < 0]
            hist["counts"].append(np.histogram(data, edges)[0].tolist())
            hist["below"].append(int((data < edges[0]).sum()))
            hist["above"].append(int((data > edges[-1]).sum()))
    result = {"heads_dim": heads_dim, **out}
    if kind:
        result[f"{kind}_histogram"] = hist
    return result
