"""Recurrent states of a Gated DeltaNet layer at chosen tokens ("snapshots"), and their statistics.

Per value head, with zero initial state, the state S_t ``[K, V]`` after token t is (DESIGN.md section 2)::

    S_t = exp(g_t) S_{t-1} + beta_t k~_t (v_t - exp(g_t) S_{t-1}^T k~_t)^T,   k~ = l2norm(k)

and the layer's ``hook_recurrence_out`` is o_t = S_t^T q~_t. Running that loop token by token is a
chain of T tiny ops; :func:`snapshot_states` instead takes C tokens at a time in the chunked (WY / UT
transform) form of Yang et al. 2024 (arXiv 2406.06484). With S0 the state before a chunk, G the
cumulative log decay inside it and A[i, j] = beta_i exp(G_i - G_j) k~_i . k~_j for j < i::

    U   = (I + A)^{-1} diag(beta) (V - exp(G) * (K~ S0))                 what each token writes
    S_t = exp(G_t) S0 + sum_{j <= t} exp(G_t - G_j) k~_j u_j^T           any t of the chunk

Only the requested S_t and the state at each chunk end are ever formed, so memory is one chunk's
``[B, Hv, C, K + V]`` plus the answers, never ``[T, Hv, K, V]``. The plain per-token reference is
:func:`gdn_dump.ops.states_reference.snapshot_states_naive`; tests hold the two together.

Shapes: ``B`` batch, ``T`` tokens, ``Hk`` key heads, ``Hv`` value heads (a multiple of ``Hk``),
``K`` key dim, ``V`` value dim, ``n`` requested (row, token) pairs, ``C`` chunk length.
"""

from __future__ import annotations

import torch

from .attention import _masked_decay, expand_kv_heads, l2norm

__all__ = ["snapshot_states", "state_statistics"]


def _check_inputs(k, v, beta, g, positions: torch.Tensor) -> torch.Tensor:
    """Validate the hook shapes and the ``[n, 2]`` (batch row, t) pairs; returns the pairs as a CPU LongTensor."""
    if k.ndim != 4 or v.ndim != 4 or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k must be [B, T, Hk, K] and v [B, T, Hv, V], got {tuple(k.shape)} and {tuple(v.shape)}")
    B, T, Hk, _ = k.shape
    Hv = v.shape[2]
    if beta.shape != (B, T, Hv) or g.shape != (B, T, Hv) or Hv % Hk:
        raise ValueError(f"beta and g must be [B, T, Hv] = {(B, T, Hv)} with Hv a multiple of Hk = {Hk}, "
                         f"got {tuple(beta.shape)} and {tuple(g.shape)}")
    if positions.ndim != 2 or positions.shape[1] != 2 or positions.dtype.is_floating_point:
        raise ValueError(f"positions must be an integer [n, 2] tensor of (row, t), got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    positions = positions.to("cpu", torch.long)
    rows, ts = positions[:, 0], positions[:, 1]
    if len(positions) and not (((rows >= 0) & (rows < B)).all() and ((ts >= 0) & (ts < T)).all()):
        raise ValueError(f"positions out of range for B={B}, T={T}")
    return positions


def _chunk(k, v, beta, g, s: int, e: int):
    """Tokens ``s:e`` of the hooks, head-major and in float32: ``k~`` ``[B, Hv, C, K]`` (normalised,
    GQA-expanded), ``v`` ``[B, Hv, C, V]``, ``beta`` ``[B, Hv, C]``, and ``G`` ``[B, Hv, C]`` float64.

    Normalised and expanded here, chunk by chunk, so no whole-sequence copy is ever made. ``G`` is the
    cumulative log decay from the chunk start, in float64: in float32, G_i - G_j would lose ~|G| * 6e-8
    in the exponent, and |G| reaches hundreds inside one chunk on fast-decaying heads.
    """
    Hv = v.shape[2]
    kn = expand_kv_heads(l2norm(k[:, s:e].float()), Hv)  # normalise Hk rows, then expand
    kn, vc, bc = (x.transpose(1, 2).float().contiguous() for x in (kn, v[:, s:e], beta[:, s:e]))
    G = g[:, s:e].transpose(1, 2).to(torch.float64).cumsum(-1)
    return kn, vc, bc, G


def _chunk_writes(kn, v, beta, gam, decay0, S0):
    """``U`` ``[B, Hv, C, V]``: what each token of the chunk writes, ``(I + A)^{-1} diag(beta) (V - exp(G) K~ S0)``.

    ``gam`` ``[B, Hv, C, C]`` holds exp(G_i - G_j) on and below the diagonal, ``decay0`` ``[B, Hv, C]``
    exp(G_i), ``S0`` ``[B, Hv, K, V]`` the state before the chunk. Token i's error against the state it
    sees depends on the writes of tokens j < i of the same chunk: that dependence is the strictly lower
    triangular A, and solving it once replaces the sequential loop.
    """
    A = (kn @ kn.transpose(-1, -2)).mul_(gam).mul_(beta[..., :, None])
    rhs = (v - decay0[..., None] * (kn @ S0)).mul_(beta[..., None])
    # unitriangular=True reads only the strict lower triangle of A: the diagonal beta_i |k~_i|^2 left
    # there is ignored and "I +" is implied.
    return torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)


def snapshot_states(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    positions: torch.Tensor,
    chunk_size: int = 64,
) -> torch.Tensor:
    """The recurrent states S_t after the requested tokens, chunk by chunk, on the inputs' device.

    Args:
        k: ``[B, T, Hk, K]`` ``hook_k`` (post-conv, before the L2 norm and the GQA expansion).
        v: ``[B, T, Hv, V]`` ``hook_v``.
        beta: ``[B, T, Hv]`` ``hook_beta``.
        g: ``[B, T, Hv]`` ``hook_log_decay`` (<= 0).
        positions: ``[n, 2]`` LongTensor of (batch row, t) pairs, any device.
        chunk_size: tokens per chunk, C.

    Returns:
        ``[n, Hv, K, V]`` float32: S_t of each pair's row, in the order of ``positions``. Chunks after
        the one holding the largest requested t are never run (no later token changes those states).
    """
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    B, T, _, K = k.shape
    Hv, V = v.shape[2], v.shape[3]
    positions = _check_inputs(k, v, beta, g, positions)  # on the CPU: grouping by chunk needs no device sync
    out = torch.zeros(len(positions), Hv, K, V, dtype=torch.float32, device=v.device)
    if len(positions) == 0:
        return out
    rows, ts = positions[:, 0], positions[:, 1]
    S0 = torch.zeros(B, Hv, K, V, dtype=torch.float32, device=v.device)
    last_chunk = int(ts.max()) // chunk_size
    for c in range(last_chunk + 1):
        s, e = c * chunk_size, min(c * chunk_size + chunk_size, T)
        kn, vc, bc, G = _chunk(k, v, beta, g, s, e)
        gam = _masked_decay(G, torch.float32)  # [B, Hv, C, C] exp(G_i - G_j), j <= i
        decay0 = G.exp().float()  # [B, Hv, C] exp(G_i): decay of S0 up to token i
        U = _chunk_writes(kn, vc, bc, gam, decay0, S0)
        # the state after the chunk's last token: row C-1 of the formula below, for every row; it
        # is also the answer for the positions at the chunk end (all of them at a stride of C)
        S_end = decay0[..., -1, None, None] * S0 + (kn * gam[..., -1, :, None]).transpose(-1, -2) @ U
        at_end = ((ts == e - 1)).nonzero()[:, 0]
        if len(at_end):
            out[at_end.to(v.device)] = S_end[rows[at_end].to(v.device)]
        inside = ((ts >= s) & (ts < e - 1)).nonzero()[:, 0]
        if len(inside):
            b, t = rows[inside].to(v.device), (ts[inside] - s).to(v.device)
            # Row t of gam weighs each earlier write j by its decay up to t, and is 0 after t.
            weighted = kn[b] * gam[b, :, t][..., None]  # [r, Hv, C, K]
            S_t = decay0[b, :, t][..., None, None] * S0[b] + weighted.transpose(-1, -2) @ U[b]
            out[inside.to(v.device)] = S_t
        S0 = S_end
    return out


def state_statistics(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frobenius norm and effective rank of each state, batched, on the states' device, in float32.

    ``states`` ``[n, H, K, V]`` -> ``(norm, effective_rank)``, both ``[n, H]`` float32. The effective rank
    is exp of the entropy of the singular values normalised to sum 1 (0 log 0 = 0; a zero matrix has
    effective rank 0), as in :func:`gdn_dump.ops.states_reference.state_statistics_naive`. One batched
    ``svdvals`` call for all n * H matrices, because per-matrix calls on a GPU are launch-bound.
    """
    x = states.float()
    norm = torch.linalg.matrix_norm(x)  # Frobenius over the last two dims
    if x.numel() == 0:
        return norm, torch.zeros_like(norm)
    sv = torch.linalg.svdvals(x)  # [n, H, min(K, V)]
    total = sv.sum(-1, keepdim=True)
    p = sv / total.clamp_min(torch.finfo(torch.float32).tiny)  # a zero matrix gives p = 0, not nan
    erank = torch.exp(-torch.xlogy(p, p).sum(-1))  # xlogy(0, 0) = 0
    return norm, torch.where(total[..., 0] > 0, erank, torch.zeros_like(erank))
