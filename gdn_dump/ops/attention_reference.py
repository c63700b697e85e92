"""Plain, readable references for :mod:`gdn_dump.attention` (slow; for tests and for reading).

Each function here states one definition as directly as possible, with no chunking, batching tricks
or solves, so that the fast paths can be held against it:

- :func:`gdn_effective_attention_naive`: run the gated delta rule token by token with the identity
  matrix as values; the output rows are M's rows. This is the *definition* of M.
- :func:`gdn_effective_attention_inverse_naive`: the closed form with an explicit matrix inverse and
  explicit loops for the decay matrix.
- :func:`gated_delta_rule_recurrent_naive`: transformers' ``torch_recurrent_gated_delta_rule``
  transcribed op for op, but in the requested precision (transformers always computes in float32, so it
  cannot serve as a float64 reference).

Shapes as in :mod:`gdn_dump.attention`: q, k ``[B, T, Hk, K]``; beta, g ``[B, T, Hv]``; v ``[B, T, Hv, Dv]``.
"""

from __future__ import annotations

import torch

from .attention import expand_kv_heads, l2norm, resolve_precision


def _normalized_qk(q, k, n_v_heads: int, dtype: torch.dtype):
    """``[B, T, Hk, K]`` -> ``q~, k~`` ``[B, T, Hv, K]`` in ``dtype``: l2norm, 1/sqrt(K) on q, GQA expansion."""
    q = expand_kv_heads(q.to(dtype), n_v_heads)
    k = expand_kv_heads(k.to(dtype), n_v_heads)
    return l2norm(q) / (q.shape[-1] ** 0.5), l2norm(k)


def gated_delta_rule_recurrent_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    precision: str = "float32",
) -> torch.Tensor:
    """The GDN recurrence with zero initial state and q/k L2 norm, in ``precision``.

    ``q, k`` ``[B, T, Hk, K]``, ``v`` ``[B, T, Hv, Dv]``, ``g, beta`` ``[B, T, Hv]`` -> ``o`` ``[B, T, Hv, Dv]``.
    Op for op transformers' ``torch_recurrent_gated_delta_rule(..., use_qk_l2norm_in_kernel=True)``, so
    in float32 the two agree bit for bit (the tests check it) and in float64 this is its exact twin.
    """
    dtype = resolve_precision(precision)
    q, k = _normalized_qk(q, k, v.shape[2], dtype)
    q, k, v, beta, g = (x.transpose(1, 2).to(dtype).contiguous() for x in (q, k, v, beta, g))
    B, H, T, K = k.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=dtype, device=v.device)
    out = torch.zeros_like(v)
    for t in range(T):
        S = S * g[:, :, t].exp()[..., None, None]  # decay the old state
        kv_mem = (S * k[:, :, t, :, None]).sum(dim=-2)  # what the state predicts for k_t
        delta = (v[:, :, t] - kv_mem) * beta[:, :, t, None]  # delta rule: write only the error
        S = S + k[:, :, t, :, None] * delta[:, :, None, :]
        out[:, :, t] = (S * q[:, :, t, :, None]).sum(dim=-2)
    return out.transpose(1, 2).contiguous()


def gdn_effective_attention_naive(
    q: torch.Tensor, k: torch.Tensor, beta: torch.Tensor, g: torch.Tensor, precision: str = "float32"
) -> torch.Tensor:
    """M ``[B, Hv, T, T]`` by running the recurrence token by token on identity values.

    With v_t = e_t (value dim T), the state S_t ``[K, T]`` maps a query to weights over past tokens,
    and o_t = S_t^T q~_t is row t of M. No cumulative sums, no exp of differences: per-step decays only.
    """
    dtype = resolve_precision(precision)
    B, T, _, _ = q.shape
    Hv = beta.shape[-1]
    q, k = _normalized_qk(q, k, Hv, dtype)  # [B, T, Hv, K]
    beta, g = beta.to(dtype), g.to(dtype)
    K = q.shape[-1]
    M = torch.zeros(B, Hv, T, T, dtype=dtype, device=q.device)
    S = torch.zeros(B, Hv, K, T, dtype=dtype, device=q.device)
    for t in range(T):
        S = S * g[:, t].exp()[:, :, None, None]
        k_t = k[:, t]  # [B, Hv, K]
        predicted = torch.einsum("bhk,bhkj->bhj", k_t, S)  # S^T k_t
        target = torch.zeros(B, Hv, T, dtype=dtype, device=q.device)
        target[:, :, t] = 1.0  # the value written at step t is e_t
        delta = beta[:, t, :, None] * (target - predicted)
        S = S + k_t[:, :, :, None] * delta[:, :, None, :]
        M[:, :, t, :] = torch.einsum("bhk,bhkj->bhj", q[:, t], S)
    return M


def gdn_effective_attention_inverse_naive(
    q: torch.Tensor, k: torch.Tensor, beta: torch.Tensor, g: torch.Tensor, precision: str = "float32"
) -> torch.Tensor:
    """M ``[B, Hv, T, T]`` as ``P (I + A)^{-1} diag(beta)`` with an explicit inverse (DESIGN.md section 2)."""
    dtype = resolve_precision(precision)
    B, T, _, _ = q.shape
    Hv = beta.shape[-1]
    q, k = _normalized_qk(q, k, Hv, dtype)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, Hv, T, K]
    beta = beta.to(dtype).transpose(1, 2)  # [B, Hv, T]
    G = g.to(torch.float64).cumsum(dim=1).transpose(1, 2)  # [B, Hv, T]
    gam = torch.zeros(B, Hv, T, T, dtype=dtype, device=q.device)
    for i in range(T):
        for j in range(i + 1):  # only j <= i: exp(G_i - G_j) above the diagonal would overflow
            gam[:, :, i, j] = (G[:, :, i] - G[:, :, j]).exp().to(dtype)
    P = (q @ k.transpose(-1, -2)) * gam
    A = torch.tril(beta[..., :, None] * (k @ k.transpose(-1, -2)) * gam, diagonal=-1)
    eye = torch.eye(T, dtype=dtype, device=q.device)
    return P @ torch.linalg.inv(eye + A) @ torch.diag_embed(beta)
