"""Exact effective attention of a Gated DeltaNet layer (fast paths).

A GDN layer's output is linear in its values, so with a zero initial state there is, per value head,
one scalar matrix ``M`` with ``o_i = sum_j M[i, j] v_j`` (DESIGN.md section 2)::

    q~ = l2norm(q) / sqrt(K),   k~ = l2norm(k),   G = cumsum(g)
    Gam[i, j] = exp(G_i - G_j) for j <= i, else 0
    P = (Q~ K~^T) * Gam
    A = strict_lower(diag(beta) (K~ K~^T * Gam))
    M = P (I + A)^{-1} diag(beta)

Two exact ways to get ``M``, with plain references beside them in :mod:`gdn_dump.attention_naive`:

- ``closed_form``: one unit-lower-triangular solve over the whole sequence, O(T^3) per head.
- ``chunked``: the chunked gated-delta-rule kernel run with the identity matrix as values (value
  dim = T), so the kernel's output rows are M's rows. O(T^2 K) per head. Our own torch kernel that
  exploits the identity values (see :func:`_chunked_torch`); with ``use_fla=True`` on CUDA,
  flash-linear-attention's kernel instead, which is faster but not exact (see :func:`_chunked_fla`).

``heuristic_effective_attention`` reproduces TransformerLens's ``compute_effective_attention`` bit
for bit, for comparison; it is not an output decomposition.

Shapes: ``B`` batch, ``T`` tokens, ``Hk`` key heads, ``Hv`` value heads (a multiple of ``Hk``),
``K`` key dim, ``Dv`` value dim. Inputs are the bridge's hooks: ``q``/``k`` ``[B, T, Hk, K]`` (after
the conv, before the L2 norm), ``beta``/``g`` ``[B, T, Hv]`` (``g`` = ``hook_log_decay``, <= 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..catalogue import MATRIX_METHODS
from ..dtypes import PRECISIONS

from .state_replay import L2NORM_EPS  # defined on the numpy side: readers replay without torch

__all__ = [
    "gdn_effective_attention_rows",
    "expand_kv_heads",
    "gdn_effective_attention",
    "heuristic_effective_attention",
    "l2norm",
    "relative_residual",
]


# ----------------------------------------------------------------------------------------------
# Shared preparation
# ----------------------------------------------------------------------------------------------


def resolve_precision(precision: str) -> torch.dtype:
    """``"float32"`` | ``"float64"`` -> the torch dtype the computation runs (and returns) in."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return getattr(torch, precision)


def expand_kv_heads(x: torch.Tensor, n_v_heads: int) -> torch.Tensor:
    """GQA expansion: ``[B, T, Hk, ...]`` -> ``[B, T, Hv, ...]``; value head h reads key head h // (Hv/Hk).

    Same as transformers' ``repeat_interleave(Hv // Hk, dim=2)`` (consecutive value heads share a key head).
    """
    n_k_heads = x.shape[2]
    if n_v_heads % n_k_heads:
        raise ValueError(f"n_v_heads ({n_v_heads}) must be a multiple of n_k_heads ({n_k_heads})")
    if n_v_heads == n_k_heads:
        return x
    return x.repeat_interleave(n_v_heads // n_k_heads, dim=2)


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """``x * rsqrt(sum(x^2, -1) + eps)``, exactly transformers' ``qwen3_5.l2norm``. ``[..., K]`` -> ``[..., K]``."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _check_inputs(q, k, beta, g) -> tuple[int, int, int, int, int]:
    """Validate hook shapes; returns ``(B, T, Hk, K, Hv)``."""
    if q.ndim != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, T, Hk, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, Hk, K = q.shape
    if beta.ndim != 3 or beta.shape != g.shape or beta.shape[:2] != (B, T):
        raise ValueError(f"beta and g must both be [B, T, Hv] with B={B}, T={T}, "
                         f"got {tuple(beta.shape)} and {tuple(g.shape)}")
    Hv = beta.shape[2]
    if Hv % Hk:
        raise ValueError(f"n_v_heads ({Hv}) must be a multiple of n_k_heads ({Hk})")
    return B, T, Hk, K, Hv


def _prepare(q, k, beta, g, dtype):
    """Normalise, GQA-expand and flatten heads into one batch axis ``N = B * Hv``.

    Returns ``q~, k~`` ``[N, T, K]`` and ``beta`` ``[N, T]`` in ``dtype``, and ``g`` ``[N, T]`` in
    float64: every decay is built from float64 cumulative sums, because in float32 ``G_i - G_j`` loses
    ~|G| * 6e-8 absolutely, and |G| reaches 1e4 on fast-decaying heads of long prompts.
    """
    _, _, _, K, Hv = _check_inputs(q, k, beta, g)
    qn = l2norm(q.to(dtype)) / math.sqrt(K)  # normalise before expanding: Hk, not Hv, rows
    kn = l2norm(k.to(dtype))
    qn, kn = (expand_kv_heads(x, Hv).transpose(1, 2).flatten(0, 1) for x in (qn, kn))
    beta = beta.to(dtype).transpose(1, 2).flatten(0, 1)
    g = g.to(torch.float64).transpose(1, 2).flatten(0, 1)
    return qn.contiguous(), kn.contiguous(), beta.contiguous(), g.contiguous()


def _masked_decay(log_cum: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[..., L]`` float64 cumulative log decay -> ``[..., L, L]`` with exp(c_i - c_j) on/below the diagonal.

    The upper triangle is set to -inf *before* exp: exp(c_i - c_j) for j > i is a growth that
    overflows to inf for strong decay, and inf * 0 would be nan.
    """
    L = log_cum.shape[-1]
    upper = torch.ones(L, L, dtype=torch.bool, device=log_cum.device).triu_(1)
    diff = log_cum[..., :, None] - log_cum[..., None, :]
    return diff.masked_fill_(upper, float("-inf")).exp_().to(dtype)


# ----------------------------------------------------------------------------------------------
# Closed form: one triangular solve
# ----------------------------------------------------------------------------------------------


def _closed_form(qn: torch.Tensor, kn: torch.Tensor, beta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``M = P (I + A)^{-1} diag(beta)`` for ``q~, k~`` ``[N, T, K]``, ``beta, g`` ``[N, T]`` -> ``[N, T, T]``."""
    gam = _masked_decay(g.cumsum(-1), qn.dtype)  # [N, T, T]
    P = (qn @ kn.transpose(-1, -2)).mul_(gam)
    # Row i of A carries beta_i. unitriangular=True reads only the strict lower triangle, so the
    # diagonal beta_i |k_i|^2 left in place is ignored and "I +" is implied.
    A = (kn @ kn.transpose(-1, -2)).mul_(gam).mul_(beta[:, :, None])
    del gam
    X = torch.linalg.solve_triangular(A, P, upper=False, left=False, unitriangular=True)  # X (I + A) = P
    return X.mul_(beta[:, None, :])


# ----------------------------------------------------------------------------------------------
# Chunked form with identity values
# ----------------------------------------------------------------------------------------------


def _chunk_blocks(qn, kn, beta, g, C: int):
    """Intra-chunk quantities for all chunks at once (the parallel first phase of the chunked kernel).

    Inputs ``q~, k~`` ``[N, T, K]``, ``beta`` ``[N, T]``, ``g`` ``[N, T]`` float64; the sequence is padded to
    ``nc * C`` with q = k = beta = g = 0, which touches no valid row or column. With ``b`` the log decay
    from the chunk start and ``Tinv = (I + A_c)^{-1}`` (the UT transform), returns:

    - ``diag`` ``[N, nc, C, C]``: M's diagonal blocks, ``P_c Tinv diag(beta)``.
    - ``XW`` ``[N, nc, 2C, K]``: ``[X; W]``, with ``W = Tinv (beta e^b k~)`` (what the old state predicts)
      and ``X = e^b q~ - P_c W`` (how the chunk's outputs read the old state).
    - ``SU`` ``[N, nc, C, K]``: the chunk's own columns of the state it leaves behind, ``U^T Kd``.
    - ``Kd`` ``[N, nc, C, K]``: keys decayed to the chunk end, ``e^(b_last - b) k~``.
    - ``decay`` ``[N, nc]``: the whole chunk's decay ``e^(b_last)``.
    """
    N, T, K = qn.shape
    dtype = qn.dtype
    nc = -(-T // C)
    pad = nc * C - T
    qn, kn = (F.pad(x, (0, 0, 0, pad)).view(N, nc, C, K) for x in (qn, kn))
    beta, g = (F.pad(x, (0, pad)).view(N, nc, C) for x in (beta, g))

    b = g.cumsum(-1)  # [N, nc, C] float64, chunk-local so the exps below never see large |G|
    gam = _masked_decay(b, dtype)
    P = (qn @ kn.transpose(-1, -2)).mul_(gam)
    A = (kn @ kn.transpose(-1, -2)).mul_(gam).mul_(beta[..., :, None])
    # Identity values: the chunk's (beta * V) restricted to its own columns is diag(beta), so U and W
    # come out of one solve with C + K right-hand sides instead of T + K.
    from_start = b.exp().to(dtype)[..., None]  # [N, nc, C, 1] decay since the chunk start
    rhs = torch.cat([torch.diag_embed(beta), (beta[..., None] * from_start) * kn], dim=-1)
    UW = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    U, W = UW[..., :C], UW[..., C:]

    Kd = kn * (b[..., -1:] - b).exp().to(dtype)[..., None]
    XW = torch.cat([qn * from_start - P @ W, W], dim=2)
    diag = (P @ U).tril_()  # lower already; tril_ makes the zeros above exact whatever the BLAS does
    return diag, XW, U.transpose(-1, -2) @ Kd, Kd, from_start[..., -1, 0]


def _chunked_rows(qn, kn, beta, g, chunk_size: int):
    """Identity-value chunked gated delta rule, one chunk of M's rows at a time: ``q~, k~``
    ``[N, T, K]``, ``beta, g`` ``[N, T]`` -> yields ``(s, rows)`` with ``rows`` ``[N, e - s, e]`` =
    ``M[:, s:e, :e]`` (the causal prefix of the chunk's rows), ``e = min(s + C, T)``.

    The generic kernel with V = I would carry a ``[K, T]`` state and ``[C, T]`` value blocks for every
    chunk. With identity values, before chunk c (rows s:e) the state has non-zero columns only
    for the keys already seen (< s), and the chunk's own value block is diag(beta) on columns s:e. So
    per chunk we touch only the causal prefix of columns::

        [Y_out; Y_w]   = [X; W] @ S[:, :s]                     one bmm   [N, 2C, s]
        M[s:e, :s]     = Y_out                                 rows read the old state
        S[:, :s]       = decay * S[:, :s] - Kd^T @ Y_w         delta-rule update of old columns
        S[:, s:e]      = Kd^T @ U                              the chunk's own columns

    and M's diagonal blocks come from the parallel phase. That is 3 C K s multiply-adds per chunk,
    1.5 K T^2 per head in total, against ~3.5 K T^2 (plus [C, T] solves) for the generic kernel.
    Memory is the state and the chunk's rows, ``N (K + C) T``, never ``N T^2``. The state is kept
    transposed, ``St = S^T`` ``[N, T, K]``, so the live prefix ``St[:, :s]`` is contiguous per head.
    Every head goes through each op together (few, large ops): each op is a thread barrier, and on
    a busy machine each barrier can cost a scheduler time slice.
    """
    N, T, K = qn.shape
    C = chunk_size
    diag, XW, SU, Kd, decay = _chunk_blocks(qn, kn, beta, g, C)
    nc = diag.shape[1]
    St = torch.empty(N, T, K, dtype=qn.dtype, device=qn.device)
    for c in range(nc):
        s, e = c * C, min(c * C + C, T)
        r = e - s  # valid rows of this chunk (< C only in the last, padded one)
        rows = torch.empty(N, r, e, dtype=qn.dtype, device=qn.device)
        rows[:, :, s:] = diag[:, c, :r, :r]
        last = c == nc - 1
        if s > 0:
            Y = XW[:, c] @ St[:, :s].transpose(1, 2)  # [N, 2C, s]
            rows[:, :, :s] = Y[:, :r]
            if not last:  # the state after the last chunk is never read
                # bmm + sub_, not baddbmm_: in place on this strided view, baddbmm_ splits into one
                # addmm (one thread barrier) per head, 10x slower on a contended 2-core machine.
                St[:, :s].mul_(decay[:, c, None, None]).sub_(torch.bmm(Y[:, C:].transpose(1, 2), Kd[:, c]))
        if not last:
            St[:, s:e] = SU[:, c, :r]
        yield s, rows


def _chunked_torch(qn, kn, beta, g, chunk_size: int) -> torch.Tensor:
    """``M`` ``[N, T, T]`` whole: the rows of :func:`_chunked_rows`, zeros above the diagonal."""
    N, T, _ = qn.shape
    M = torch.zeros(N, T, T, dtype=qn.dtype, device=qn.device)
    for s, rows in _chunked_rows(qn, kn, beta, g, chunk_size):
        M[:, s:s + rows.shape[1], :rows.shape[2]] = rows
    return M


def _fla_kernel_for(q: torch.Tensor, dtype: torch.dtype):
    """flash-linear-attention's ``chunk_gated_delta_rule`` where it applies (CUDA, float32, importable), else None.

    float64 always takes the torch path: fla's Triton kernels do not compute in float64.
    """
    if not (q.is_cuda and dtype == torch.float32):
        return None
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # not installed, or a Triton that does not load: the torch path serves
        return None
    return chunk_gated_delta_rule


def _chunked_fla(kernel, q, k, beta, g) -> torch.Tensor | None:
    """M ``[B, Hv, T, T]`` from fla's kernel fed identity values ``[B, T, Hv, T]``; None if it refuses float32.

    fla normalises q/k itself (``use_qk_l2norm_in_kernel``, same eps) and scales by K^-0.5. Measured
    on an H100 with fla 0.6.0 (L = 2048, 16 heads, d_k 128): 3.2 ms against 9.9 ms for the torch
    kernel, but max |M - M_exact| / max |M_exact| ~ 1.5e-3, because Triton runs its float32 dots in
    TF32. With TRITON_F32_DEFAULT=ieee the error drops to ~2e-5 and the time rises to 8.6 ms, no
    faster than the torch kernel. Hence opt-in only.
    """
    B, T, _, K = q.shape
    Hv = beta.shape[-1]
    q, k = (expand_kv_heads(x.float(), Hv).contiguous() for x in (q, k))  # older fla needs Hq == Hv
    eye = torch.eye(T, dtype=torch.float32, device=q.device)
    v = eye[None, :, None, :].expand(B, T, Hv, T).contiguous()  # v[b, t, h] = e_t
    try:
        o, _ = kernel(q, k, v, g.float().contiguous(), beta.float().contiguous(), scale=K**-0.5,
                      initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=True)
    except AssertionError:  # some fla releases assert "does not support float32"
        return None
    return o.transpose(1, 2).contiguous().tril_()  # o[b, i, h, j] = M[b, h, i, j]; exact zeros above


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def gdn_effective_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    *,
    method: str = "closed_form",
    precision: str = "float32",
    chunk_size: int = 64,
    use_fla: bool = False,
) -> torch.Tensor:
    """Exact effective attention ``M`` ``[B, Hv, T, T]`` of one GDN layer (zero initial state).

    Args:
        q, k: ``[B, T, Hk, K]`` ``hook_q`` / ``hook_k`` (post-conv, pre-L2-norm), any float dtype.
        beta: ``[B, T, Hv]`` ``hook_beta``.
        g: ``[B, T, Hv]`` ``hook_log_decay`` (log of the per-step decay, <= 0).
        method: ``"closed_form"`` (triangular solve, O(T^3)) or ``"chunked"`` (identity-value
            chunked kernel, O(T^2 K)).
        precision: ``"float32"`` or ``"float64"``: the compute and result dtype.
        chunk_size: chunk length of the ``chunked`` torch kernel (the fla kernel uses its own 64).
        use_fla: ``chunked`` on CUDA in float32 only: run flash-linear-attention's kernel where it
            imports (~3x faster on an H100, but TF32 inside: ~1e-3 relative error, so M is approximate).
            Ignored (torch kernel) where fla does not apply.

    Returns:
        ``M`` with ``o[b, i, h] = sum_j M[b, h, i, j] v[b, j, h]``; lower triangular including the
        diagonal, exact zeros above. Rows of a right-padded batch are those of each prompt alone.
    """
    dtype = resolve_precision(precision)
    B, T, _, _, Hv = _check_inputs(q, k, beta, g)
    if method not in MATRIX_METHODS:
        raise ValueError(f"method must be one of {MATRIX_METHODS}, got {method!r}")
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if T == 0:
        return q.new_zeros(B, Hv, 0, 0, dtype=dtype)
    if method == "chunked" and use_fla:
        kernel = _fla_kernel_for(q, dtype)
        if kernel is not None:
            M = _chunked_fla(kernel, q, k, beta, g)
            if M is not None:
                return M
    qn, kn, b, gg = _prepare(q, k, beta, g, dtype)
    if method == "closed_form":
        M = _closed_form(qn, kn, b, gg)
    else:
        M = _chunked_torch(qn, kn, b, gg, chunk_size)
    return M.view(B, Hv, T, T)


def gdn_effective_attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    *,
    precision: str = "float32",
    chunk_size: int = 64,
    rows: int = 256,
):
    """The exact matrix of :func:`gdn_effective_attention` (``chunked``) of ONE prompt, a block of
    query rows at a time, so that memory stays linear in T: ``q, k`` ``[1, T, Hk, K]``, ``beta, g``
    ``[1, T, Hv]`` -> yields ``(top, block)`` with ``block`` ``[Hv, r, top + r]`` = ``M[0, :,
    top:top + r, :top + r]`` (``r = rows`` but for the last block; columns past the block's last row
    are above the diagonal: zero, not included). ``rows`` must be a multiple of ``chunk_size``.
    """
    dtype = resolve_precision(precision)
    B, T, _, _, Hv = _check_inputs(q, k, beta, g)
    if B != 1 or rows % chunk_size:
        raise ValueError(f"one prompt at a time, rows a multiple of chunk_size; got B={B}, "
                         f"rows={rows}, chunk_size={chunk_size}")
    qn, kn, b, gg = _prepare(q, k, beta, g, dtype)
    block, top = None, 0
    for s, part in _chunked_rows(qn, kn, b, gg, chunk_size):
        if block is None:
            top = s
            block = torch.zeros(Hv, min(rows, T - s), min(s + rows, T), dtype=dtype, device=q.device)
        block[:, s - top:s - top + part.shape[1], :part.shape[2]] = part
        if s + part.shape[1] == top + block.shape[1]:
            yield top, block
            block = None


def heuristic_effective_attention(
    q: torch.Tensor, k: torch.Tensor, beta: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    """TransformerLens's ``GatedDeltaNetBridge.compute_effective_attention``, bit for bit, from tensors.

    ``M[i, j] = (q_i . k_j) beta_j exp(G_i - G_j)`` on raw (un-normalised, unscaled) q/k, no delta-rule
    removal: a heuristic kept for comparison. ``q, k`` ``[B, T, Hk, K]``, ``beta, g`` ``[B, T, Hv]`` ->
    ``[B, Hv, T, T]`` float32. The op order below is TL 4.3's; do not "improve" it (tests use torch.equal).
    """
    q = q.float()
    k = k.float()
    beta = beta.float()
    g = g.float()
    if q.shape[2] < beta.shape[-1]:
        repeat = beta.shape[-1] // q.shape[2]
        q = q.repeat_interleave(repeat, dim=2)
        k = k.repeat_interleave(repeat, dim=2)
    seq = q.shape[1]
    qk = torch.matmul(q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3).transpose(-2, -1))
    cumsum_g = torch.cumsum(g.permute(0, 2, 1), dim=-1)
    L_log = cumsum_g[:, :, :, None] - cumsum_g[:, :, None, :]
    causal_mask = torch.tril(torch.ones(seq, seq, dtype=torch.bool, device=q.device))
    L = torch.where(causal_mask[None, None], torch.exp(L_log), torch.zeros_like(L_log))
    beta_col = beta.permute(0, 2, 1)[:, :, None, :]
    return qk * beta_col * L


def relative_residual(
    M: torch.Tensor, v: torch.Tensor, recurrence_out: torch.Tensor, *, per_head: bool = False
) -> torch.Tensor:
    """How well ``M`` reproduces the layer: ``||M V - o|| / ||o||`` in float64.

    Args:
        M: ``[B, Hv, T, T]`` effective attention.
        v: ``[B, T, Hv, Dv]`` ``hook_v`` (post-conv values).
        recurrence_out: ``[B, T, Hv, Dv]`` ``hook_recurrence_out``.
        per_head: False -> one Frobenius ratio per prompt ``[B]``; True -> per prompt and head ``[B, Hv]``.

    A zero ``o`` gives 0 where ``M V`` is zero too and inf otherwise.
    """
    mv = torch.matmul(M.to(torch.float64), v.to(torch.float64).transpose(1, 2))  # [B, Hv, T, Dv]
    o = recurrence_out.to(torch.float64).transpose(1, 2)
    dims = (2, 3) if per_head else (1, 2, 3)
    num = torch.linalg.vector_norm(mv - o, dim=dims)
    den = torch.linalg.vector_norm(o, dim=dims)
    zero_ok = torch.where(num == 0, torch.zeros_like(num), torch.full_like(num, math.inf))
    return torch.where(den > 0, num / den, zero_ok)
