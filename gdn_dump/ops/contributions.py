"""Exact per-source-token contributions of every head to a layer's output, and to a logit.

Everything between the values and a GDN layer's output is linear once the per-token
normalisation is fixed (Qwen3.5's gated RMSNorm, per head, with the factor of the full
``o_{i,h}``, as in any direct attribution):

    out_i = W_out . concat_h [ g_{i,h} * o_{i,h} ],   g_{i,h} = rsqrt(mean(o_{i,h}^2) + eps) w * silu(z_{i,h})
    o_{i,h} = sum_j M_h[i, j] v_{j,h}
    =>  out_i = sum_h sum_j c_{h,i,j},   c_{h,i,j} = M_h[i, j] W_h (g_{i,h} * v_{j,h})

with ``W_h = W_out[:, h Dv:(h + 1) Dv]``. A gated softmax-attention layer is the same with
``g = sigmoid(gate)`` and ``M = alpha`` (:func:`softmax_gate`). The norms never build
``[L, L, d_model]``: ``||W_h (g_i * v_j)||^2 = (g_i g_i^T * G_h) . (v_j v_j^T)`` with
``G_h = W_h^T W_h``, one matrix product ``[L, P] x [P, L]`` per head (``P = Dv(Dv+1)/2``: only the distinct
pairs ``a <= b`` of the symmetric ``Dv x Dv`` terms are formed, in the cyclic order of
:func:`pair_order`). The logit of token t through the
final norm, its scale ``r_i`` frozen at position i, is
``r_i M[i, j] ((W_h^T u_i) * g_i) . v_j`` with ``u_i = (1 + w_final) * W_U[t_{i+1}]``.

:mod:`.contributions_reference` states the same with loops over h, i, j; tests hold them together.

Shapes: ``M`` ``[H, L, L]``, ``v`` ``[L, H, Dv]`` (key/value heads already expanded to H),
``gate`` ``[L, H, Dv]``, ``w_out`` ``[d_model, H * Dv]``, ``unembed`` ``[L, d_model]``; or a block of
R query rows against its C = top + R key columns: ``M`` ``[H, R, C]``, ``v`` ``[C, H, Dv]``,
``gate`` ``[R, H, Dv]``, ``unembed`` ``[R, d_model]`` (outputs ``[H, R, C]``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

QUAD_BLOCK_BYTES = 24 << 20  # each operand ([P, rows], [P, cols] pair products) of one block of the norms' product


def gated_rmsnorm_gate(o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """``g`` ``[L, H, Dv]`` of Qwen3.5's gated RMSNorm: ``rsqrt(mean(o^2) + eps) * w * silu(z)``,
    so that the norm's output is ``g * o`` (``o``, ``z`` ``[L, H, Dv]``, ``weight`` ``[Dv]``)."""
    o, z = o.float(), z.float()
    scale = torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps)
    return scale * weight.float() * F.silu(z)


def softmax_gate(gate: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``g`` ``[L, H, Dv]`` of Qwen3.5's gated attention: ``sigmoid(gate)`` (``[L, H]`` or ``[L, H, Dv]``)."""
    g = torch.sigmoid(gate.float())
    return g[..., None].expand(*g.shape, head_dim) if g.dim() == 2 else g


def head_weights(w_out: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``W_out`` ``[d_model, H * Dv]`` -> ``[H, d_model, Dv]``, one block of columns per head."""
    d_model = w_out.shape[0]
    return w_out.reshape(d_model, n_heads, -1).permute(1, 0, 2)


def head_columns(w_out: torch.Tensor, n_heads: int, heads: list[int]) -> torch.Tensor:
    """``W_out`` ``[d_model, H * Dv]`` -> ``[d_model, len(heads) * Dv]``: the columns of ``heads``
    only, in that order (what the functions here take as ``w_out`` for a subset of heads)."""
    return head_weights(w_out, n_heads)[heads].permute(1, 0, 2).reshape(w_out.shape[0], -1)


def contribution_vectors(M, v, gate, w_out) -> torch.Tensor:
    """``c`` ``[H, L, L, d_model]``: ``c[h, i, j] = M[h, i, j] W_h (g[i, h] * v[j, h])``."""
    W = head_weights(w_out, M.shape[0])  # [H, D, Dv]
    gv = gate.permute(1, 0, 2)[:, :, None, :] * v.permute(1, 0, 2)[:, None, :, :]  # [H, L, L, Dv]
    return M[..., None] * torch.einsum("hdk,hijk->hijd", W, gv)


def contribution_norms(M, v, gate, w_out, block_bytes: int = QUAD_BLOCK_BYTES) -> torch.Tensor:
    """``||c[h, i, j]||_2`` ``[H, R, C]`` from quadratic forms (see the module): one product
    ``[rows, P] x [P, cols]`` per head and block; blocks of query rows, of key columns and of heads
    such that each operand (query side, key side: pair products, :func:`pair_products`) stays
    within ``block_bytes``.

    Few ops, each large: the packed ``G`` of every head from one batched product; each side's
    pair products of a block in one op, into a buffer reused by every block (the query side
    row-major, ``[rows, P]``, the product's fast layout); one (batched) product per block, written
    straight into the output; the square root and ``|M|`` over everything at the end. Many small ops cost little
    each but every one waits for all threads, which a busy machine makes slow; large buffers cost
    page faults each call (the default keeps each below glibc's largest mmap threshold, 32 MiB,
    so that the allocator reuses them)."""
    H, R, C = M.shape
    Dv = v.shape[-1]
    P = Dv * (Dv + 1) // 2
    n_pairs = pair_rows(Dv)
    dtype = torch.promote_types(torch.promote_types(v.dtype, gate.dtype), w_out.dtype)
    if M.dtype != dtype:
        return contribution_norms(M.to(dtype), v, gate, w_out, block_bytes).to(M.dtype)
    pair_bytes = n_pairs * M.element_size()
    rows = max(1, min(R, block_bytes // pair_bytes))
    cols = max(1, min(C, block_bytes // pair_bytes))
    group = max(1, min(H, block_bytes // (pair_bytes * max(rows, cols))))
    G = packed_gram(w_out.to(dtype), H)[:, None, :]  # [H, 1, P]
    vt = doubled(v.to(dtype).permute(1, 2, 0), -2)  # [H, Dv + Dv // 2, C]
    gq = doubled(gate.to(dtype).transpose(0, 1), -1)  # [H, R, Dv + Dv // 2]
    q_buf = torch.empty(group * rows * n_pairs, dtype=dtype, device=M.device)  # reused by every block
    kv_buf = torch.empty(group * n_pairs * cols, dtype=dtype, device=M.device)
    out = torch.empty_like(M)  # first ||c_ij||^2 / M_ij^2 (the quadratic forms), at the end ||c_ij||
    for h in range(0, H, group):
        g = min(group, H - h)
        for lo in range(0, R, rows):
            r = min(rows, R - lo)
            q = pair_products(gq[h:h + g, lo:lo + r], q_buf[:g * r * n_pairs].view(g, r, n_pairs),
                              is_doubled=True)[..., :P]
            q.mul_(G[h:h + g])  # [g, r, P]: g_ia g_ib G_ab (row-major: the product's fast layout)
            for left in range(0, C, cols):
                c = min(cols, C - left)
                kv = pair_products(vt[h:h + g, :, left:left + c], kv_buf[:g * n_pairs * c].view(g, n_pairs, c),
                                   dim=-2, is_doubled=True)[:, :P]  # [g, P, c]
                # straight into out, a strided view where the columns are split (BLAS's ldc)
                torch.matmul(q, kv, out=out[h:h + g, lo:lo + r, left:left + c])
    return out.clamp_min_(0).sqrt_().mul_(M).abs_()


def pair_rows(D: int) -> int:
    """Rows :func:`pair_products` writes for ``D``: ``(D // 2 + 1) D``, of which the first
    ``D (D + 1) / 2`` are the distinct pairs (even ``D``: ``D / 2`` repeats follow)."""
    return (D // 2 + 1) * D


@functools.lru_cache(maxsize=8)
def pair_order(D: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` ``[D (D + 1) / 2]`` each: the order of :func:`pair_products`, every unordered pair
    of ``0..D-1`` once (with ``a == b``): offset ``d = 0..D // 2``, then ``a = 0..D-1``, ``b = (a + d) mod D``."""
    d = torch.arange(D // 2 + 1, device=device)[:, None]
    a = torch.arange(D, device=device)[None, :].expand(len(d), D)
    P = D * (D + 1) // 2
    return a.reshape(-1)[:P], ((a + d) % D).reshape(-1)[:P]


def doubled(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x`` and then its first ``D // 2`` entries along ``dim`` again (``D + D // 2`` in all): what
    :func:`pair_products` slides its window over."""
    return torch.cat([x, x.narrow(dim, 0, x.shape[dim] // 2)], dim=dim)


def pair_products(x: torch.Tensor, out: torch.Tensor | None = None, dim: int = -1,
                  is_doubled: bool = False) -> torch.Tensor:
    """The products ``x_a x_b`` of every pair ``a <= b`` along ``dim`` (-1: ``[..., D]`` ->
    ``[..., pair_rows(D)]``; -2: ``[..., D, N]`` -> ``[..., pair_rows(D), N]``), in :func:`pair_order`:
    its first ``D (D + 1) / 2`` entries, then, for even ``D``, ``D / 2`` repeats. The cyclic order
    makes it one elementwise op, ``x_a * X_{a + d}`` with ``X`` = :func:`doubled` ``x`` seen through a
    sliding window, instead of one op per row of the triangle. ``is_doubled``: ``x`` is already
    :func:`doubled` (saves that op in a loop). ``out``: written into, and returned."""
    assert dim in (-1, -2)
    X = x if is_doubled else doubled(x, dim)
    D = (2 * X.shape[dim] + 1) // 3  # X.shape[dim] = D + D // 2
    if dim == -1:
        window = X.unfold(-1, D, 1)  # [..., D // 2 + 1, D]: [d, a] = x_{(a + d) % D}
        first = X[..., None, :D]
        shape = (*X.shape[:-1], pair_rows(D))
    else:
        window = X.unfold(-2, D, 1).transpose(-1, -2)  # [..., D // 2 + 1, D, N]
        first = X[..., None, :D, :]
        shape = (*X.shape[:-2], pair_rows(D), X.shape[-1])
    if out is None:
        out = torch.empty(shape, dtype=X.dtype, device=X.device)
    torch.mul(first, window, out=out.view(window.shape))
    return out


def packed_gram(w_out: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[H, P]``: each ``G_h = W_h^T W_h`` at the pairs of :func:`pair_order`, off-diagonal terms
    twice, so that ``x^T G_h x = packed_gram[h] . pair_products(x)[:P]``."""
    W = head_weights(w_out, n_heads)  # [H, D, Dv]
    G = W.transpose(1, 2) @ W  # [H, Dv, Dv]
    a, b = pair_order(G.shape[-1], str(G.device))
    return G[:, a, b] * torch.where(a == b, 1.0, 2.0).to(G.dtype)


def contribution_logits(M, v, gate, w_out, unembed) -> torch.Tensor:
    """``[H, L, L]``: ``unembed[i] . c[h, i, j]`` (``unembed[i]`` = the frozen final norm's scale
    at i times ``(1 + w_final) * W_U[t]``; a zero row gives zero)."""
    W = head_weights(w_out, M.shape[0])  # [H, D, Dv]
    a = torch.einsum("id,hdk->hik", unembed, W) * gate.permute(1, 0, 2)  # [H, L, Dv]
    return M * torch.einsum("hik,jhk->hij", a, v)


def final_norm_unembed(x: torch.Tensor, w_final: torch.Tensor, w_u: torch.Tensor,
                       targets: torch.Tensor, eps: float) -> torch.Tensor:
    """``unembed`` ``[L, d_model]`` for :func:`contribution_logits`: row i is
    ``rsqrt(mean(x_i^2) + eps) (1 + w_final) * W_U[targets[i]]`` (``x`` ``[L, d_model]`` the final
    norm's input; ``targets`` ``[L]``, -1 for no target: a zero row)."""
    r = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    rows = w_u[targets.clamp_min(0)].float() * (1.0 + w_final.float())
    return torch.where(targets[:, None] >= 0, r * rows, torch.zeros_like(rows))
