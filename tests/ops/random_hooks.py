"""Random GDN hook tensors for the ops tests (test_attention.py, test_states.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_hooks(B, T, Hk, Hv, K, V, *, dtype=torch.float32, seed=0, g_spread=1.0):
    """q, k ``[B, T, Hk, K]``, v ``[B, T, Hv, V]``, beta, g ``[B, T, Hv]`` in ``dtype``.

    g = -softplus(x) * exp(s * y) spans gentle (~-0.01) to strong (~-10 and beyond) per-step decays, so
    |G| reaches a few hundred by T = 130 and exp(G_i - G_j) above the diagonal overflows float32.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k = randn(B, T, Hk, K) * 2, randn(B, T, Hk, K) * 2
    v = randn(B, T, Hv, V)
    beta = randn(B, T, Hv).sigmoid()
    g = -F.softplus(randn(B, T, Hv)) * (g_spread * randn(B, T, Hv)).exp()
    return tuple(x.to(dtype) for x in (q, k, v, beta, g))
