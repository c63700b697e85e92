"""Plain, readable references for :mod:`gdn_dump.ops.states` (slow; for tests and for reading).

- :func:`snapshot_states_naive`: the gated delta rule run token by token, one state per value head,
  copied out after each requested token. This is the *definition* of the snapshot S_t.
- :func:`state_statistics_naive`: Frobenius norm and effective rank, one matrix at a time in float64.

The recurrence (DESIGN.md section 2), per value head, zero initial state, S_t ``[K, V]``::

    k~_t = l2norm(k_t)
    S_t  = exp(g_t) S_{t-1} + beta_t k~_t (v_t - exp(g_t) S_{t-1}^T k~_t)^T

Shapes: ``B`` batch, ``T`` tokens, ``Hk`` key heads, ``Hv`` value heads (a multiple of ``Hk``),
``K`` key dim, ``V`` value dim, ``n`` requested (row, token) pairs.
"""

from __future__ import annotations

import math

import torch

from .attention import expand_kv_heads, l2norm, resolve_precision
from .states import _check_inputs


def snapshot_states_naive(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    positions: torch.Tensor,
    precision: str = "float32",
) -> torch.Tensor:
    """The recurrent states S_t after the requested tokens, by a plain per-token loop.

    Args:
        k: ``[B, T, Hk, K]`` ``hook_k`` (post-conv, before the L2 norm and the GQA expansion).
        v: ``[B, T, Hv, V]`` ``hook_v``.
        beta: ``[B, T, Hv]`` ``hook_beta``.
        g: ``[B, T, Hv]`` ``hook_log_decay`` (<= 0).
        positions: ``[n, 2]`` LongTensor of (batch row, t) pairs.
        precision: ``"float32"`` or ``"float64"``: the compute and result dtype.

    Returns:
        ``[n, Hv, K, V]``: S_t of each pair's row, in the order of ``positions``.
    """
    dtype = resolve_precision(precision)
    B, T, _, K = k.shape
    Hv, V = v.shape[2], v.shape[3]
    positions = _check_inputs(k, v, beta, g, positions)
    out = torch.zeros(len(positions), Hv, K, V, dtype=dtype, device=v.device)
    if len(positions) == 0:
        return out
    S = torch.zeros(B, Hv, K, V, dtype=dtype, device=v.device)
    for t in range(int(positions[:, 1].max()) + 1):  # no later token changes a requested state
        k_t = expand_kv_heads(l2norm(k[:, t].to(dtype))[:, None], Hv)[:, 0]  # [B, Hv, K]
        v_t = v[:, t].to(dtype)  # [B, Hv, V]
        beta_t = beta[:, t].to(dtype)[:, :, None]  # [B, Hv, 1]
        S = S * g[:, t].to(dtype).exp()[:, :, None, None]  # decay the old state
        predicted = torch.einsum("bhk,bhkv->bhv", k_t, S)  # S^T k~_t: what the state recalls for k_t
        S = S + k_t[:, :, :, None] * (beta_t * (v_t - predicted))[:, :, None, :]  # write the error
        for i in (positions[:, 1] == t).nonzero()[:, 0].tolist():
            out[i] = S[positions[i, 0]]
    return out


def state_statistics_naive(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frobenius norm and effective rank of each state, one matrix at a time in float64.

    ``states`` ``[n, H, K, V]`` -> ``(norm, effective_rank)``, both ``[n, H]`` float64. The effective
    rank (Roy & Vetterli 2007) is exp of the entropy of the singular values normalised to sum 1, with
    0 log 0 = 0; it is 1 for a rank-1 matrix, r for r equal singular values, and 0 for a zero matrix.
    """
    n, H = states.shape[:2]
    norm = torch.zeros(n, H, dtype=torch.float64)
    erank = torch.zeros(n, H, dtype=torch.float64)
    for i in range(n):
        for h in range(H):
            S = states[i, h].to("cpu", torch.float64)
            norm[i, h] = math.sqrt(float((S * S).sum()))
            sv = torch.linalg.svdvals(S)
            if sv.sum() == 0:
                continue  # a zero matrix: no direction at all, effective rank 0
            p = sv / sv.sum()
            entropy = -sum(float(x) * math.log(float(x)) for x in p if x > 0)
            erank[i, h] = math.exp(entropy)
    return norm, erank
