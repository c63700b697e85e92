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
``G_h = W_h^T W_h``, one matrix product ``[L, P] x [P, L]`` per head (``P = Dv(Dv+1)/2``: only the upper
triangle of the symmetric ``Dv x Dv`` terms is formed). The logit of token t through the
final norm, its scale ``r_i`` frozen at position i, is
``r_i M[i, j] ((W_h^T u_i) * g_i) . v_j`` with ``u_i = (1 + w_final) * W_U[t_{i+1}]``.

:mod:`.contributions_reference` states the same with loops over h, i, j; tests hold them together.

Shapes: ``M`` ``[H, L, L]``, ``v`` ``[L, H, Dv]`` (key/value heads already expanded to H),
``gate`` ``[L, H, Dv]``, ``w_out`` ``[d_model, H * Dv]``, ``unembed`` ``[L, d_model]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUAD_BLOCK_BYTES = 256 << 20  # the [rows, Dv(Dv+1)/2] operands of one block of the norms' product


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


def contribution_vectors(M, v, gate, w_out) -> torch.Tensor:
    """``c`` ``[H, L, L, d_model]``: ``c[h, i, j] = M[h, i, j] W_h (g[i, h] * v[j, h])``."""
    W = head_weights(w_out, M.shape[0])  # [H, D, Dv]
    gv = gate.permute(1, 0, 2)[:, :, None, :] * v.permute(1, 0, 2)[:, None, :, :]  # [H, L, L, Dv]
    return M[..., None] * torch.einsum("hdk,hijk->hijd", W, gv)


def contribution_norms(M, v, gate, w_out, block_bytes: int = QUAD_BLOCK_BYTES) -> torch.Tensor:
    """``||c[h, i, j]||_2`` ``[H, L, L]`` from quadratic forms (see the module), a block of query
    rows at a time so the operands stay within ``block_bytes``."""
    H, L, _ = M.shape
    W = head_weights(w_out, H)
    Dv = v.shape[-1]
    P = Dv * (Dv + 1) // 2
    out = torch.empty_like(M)
    rows = max(1, block_bytes // max(P * v.element_size() * 2, 1))
    for h in range(H):
        G = W[h].T @ W[h]
        # the upper triangle of the symmetric G_h, off-diagonal terms twice: [P]
        G = torch.cat([torch.cat([G[a, a:a + 1], 2 * G[a, a + 1:]]) for a in range(Dv)])
        vv = upper_products(v[:, h])  # [L, P]
        for lo in range(0, L, rows):
            gg = upper_products(gate[lo:lo + rows, h]) * G  # [rows, P]
            squared = (gg @ vv.T).clamp_min_(0)  # [rows, L]
            out[h, lo:lo + rows] = M[h, lo:lo + rows].abs() * squared.sqrt()
    return out


def upper_products(x: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` -> ``[N, D(D+1)/2]``: ``x_a x_b`` for ``a <= b``, row-major (the order of
    ``torch.triu_indices``); built a row of the triangle at a time (an index gather is ~3x slower)."""
    return torch.cat([x[:, a:a + 1] * x[:, a:] for a in range(x.shape[1])], dim=1)


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
