"""The gated delta rule's recurrent state in plain numpy (float64), and measures of a state.

Per value head h (DESIGN.md section 2)::

    k~_t = l2norm(k_t),   S_t = exp(g_t) S_{t-1} + beta_t k~_t (v_t - exp(g_t) S_{t-1}^T k~_t)^T

with S_t of shape [d_k, d_v], oriented so that o_t = S_t^T q~_t. :func:`replay_state` runs this
from a stored snapshot (or the zero state) over stored rows; readers use it to get S_t at any
position of a prompt from the snapshots a run keeps every N tokens. No torch: reading a store
must work where torch is not installed.
"""

from __future__ import annotations

import numpy as np

# transformers' l2norm (and fla's): x * rsqrt(sum x^2 + 1e-6). The one definition: here, on the
# numpy side, so that the torch forms (gdn_dump.ops.attention) and the readers share it.
L2NORM_EPS = 1e-6

__all__ = ["L2NORM_EPS", "l2norm", "expand_key_heads", "replay_state", "frobenius_norm",
           "singular_values", "effective_rank"]


def l2norm(x: np.ndarray, eps: float = L2NORM_EPS) -> np.ndarray:
    """``x / sqrt(sum(x^2, -1) + eps)`` in float64: ``[..., K]`` -> ``[..., K]``."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps)


def expand_key_heads(x: np.ndarray, n_v_heads: int) -> np.ndarray:
    """``[n, Hk, K]`` -> ``[n, Hv, K]``: value head h uses key head ``h // (Hv // Hk)``
    (torch's ``repeat_interleave``)."""
    n_k_heads = x.shape[1]
    if n_v_heads % n_k_heads:
        raise ValueError(f"{n_v_heads} value heads are not a multiple of {n_k_heads} key heads")
    return np.repeat(x, n_v_heads // n_k_heads, axis=1)


def replay_state(state: np.ndarray | None, k: np.ndarray, v: np.ndarray, beta: np.ndarray,
                 g: np.ndarray) -> np.ndarray:
    """The state after running the recurrence over ``n`` tokens from ``state``.

    ``state`` [H, K, V] (None: the zero state), ``k`` [n, Hk, K] (before the l2 norm),
    ``v`` [n, H, V], ``beta`` and ``g`` (log decay) [n, H]. Returns [H, K, V] float64; with
    ``n == 0``, ``state`` itself (as float64). A plain loop over tokens, vectorised over heads:
    the reference the stored snapshots are checked against, and fast enough for the stride
    between two snapshots.
    """
    v = np.asarray(v, dtype=np.float64)
    n, n_heads, d_v = v.shape
    keys = expand_key_heads(l2norm(k), n_heads)  # normalise per key head, then share
    beta = np.asarray(beta, dtype=np.float64).reshape(n, n_heads)
    decay = np.exp(np.asarray(g, dtype=np.float64)).reshape(n, n_heads)
    s = (np.zeros((n_heads, keys.shape[2], d_v)) if state is None
         else np.array(state, dtype=np.float64))  # a copy: the caller's snapshot stays as it is
    if keys.shape[:2] != (n, n_heads) or s.shape != (n_heads, keys.shape[2], d_v):
        raise ValueError(f"shapes do not fit: state {s.shape}, k {np.shape(k)}, v {v.shape}")
    for t in range(n):
        s *= decay[t, :, None, None]
        predicted = np.einsum("hkv,hk->hv", s, keys[t])  # what the decayed state recalls for k~_t
        s += beta[t, :, None, None] * keys[t, :, :, None] * (v[t] - predicted)[:, None, :]
    return s


def frobenius_norm(states: np.ndarray) -> np.ndarray:
    """``sqrt(sum S^2)`` of each matrix: ``[..., K, V]`` -> ``[...]`` float64."""
    s = np.asarray(states, dtype=np.float64)
    return np.sqrt(np.sum(s * s, axis=(-2, -1)))


def singular_values(states: np.ndarray) -> np.ndarray:
    """Singular values of each matrix, largest first: ``[..., K, V]`` -> ``[..., min(K, V)]``."""
    return np.linalg.svd(np.asarray(states, dtype=np.float64), compute_uv=False)


def effective_rank(states: np.ndarray) -> np.ndarray:
    """Effective rank of each matrix (Roy & Vetterli 2007): ``exp(H(p))`` with p the singular
    values normalised to sum 1 and H the entropy (0 log 0 = 0). ``[..., K, V]`` -> ``[...]``
    float64, between 1 and min(K, V); 0 for a zero matrix (it has no direction at all)."""
    s = singular_values(states)  # [..., min(K, V)]
    total = s.sum(axis=-1, keepdims=True)
    p = np.divide(s, total, out=np.zeros_like(s), where=total > 0)
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    rank = np.exp(-np.sum(p * logs, axis=-1))
    return np.where(total[..., 0] > 0, rank, 0.0)
