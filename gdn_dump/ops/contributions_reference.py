"""Plain references for :mod:`gdn_dump.ops.contributions`: loops over heads, queries and keys,
every contribution vector built explicitly (slow; for tests and for reading). Same shapes."""

from __future__ import annotations

import torch


def contribution_vectors_naive(M, v, gate, w_out) -> torch.Tensor:
    """``c[h, i, j] = M[h, i, j] * W_out[:, h Dv:(h + 1) Dv] @ (gate[i, h] * v[j, h])``."""
    H, L, _ = M.shape
    Dv = v.shape[-1]
    out = torch.zeros(H, L, L, w_out.shape[0], dtype=M.dtype)
    for h in range(H):
        W = w_out[:, h * Dv:(h + 1) * Dv]
        for i in range(L):
            for j in range(i + 1):
                out[h, i, j] = M[h, i, j] * (W @ (gate[i, h] * v[j, h]))
    return out


def contribution_norms_naive(M, v, gate, w_out) -> torch.Tensor:
    return contribution_vectors_naive(M, v, gate, w_out).norm(dim=-1)


def contribution_logits_naive(M, v, gate, w_out, unembed) -> torch.Tensor:
    c = contribution_vectors_naive(M, v, gate, w_out)
    H, L = M.shape[:2]
    out = torch.zeros(H, L, L, dtype=M.dtype)
    for h in range(H):
        for i in range(L):
            for j in range(L):
                out[h, i, j] = unembed[i] @ c[h, i, j]
    return out
