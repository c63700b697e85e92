"""Tests for gdn_dump.ops.states: recurrent-state snapshots and their statistics (CPU, seconds).

Anchors, each independent of our code:
- the plain per-token loop ``snapshot_states_naive`` in float64 (the definition),
- TransformerLens's own eager scan ``GatedDeltaNetBridge._gated_delta_scan`` (its state trajectory),
- transformers' ``torch_recurrent_gated_delta_rule`` (the model's recurrence: its outputs o_t = S_t^T q~_t
  and its final state).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformer_lens.model_bridge.generalized_components.gated_delta_net import GatedDeltaNetBridge
from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

from gdn_dump.ops.attention import expand_kv_heads, l2norm
from gdn_dump.ops.states import snapshot_states, state_statistics
from gdn_dump.ops.states_reference import snapshot_states_naive, state_statistics_naive

from .random_hooks import random_hooks

# (B, T, Hk, Hv, K, V): GQA 4 with d_k != d_v over two full chunks and a ragged third; and GQA 1.
CASES = [(2, 150, 2, 8, 16, 24), (1, 150, 4, 4, 24, 16)]
CASE_IDS = [f"B{b}-T{t}-Hk{hk}-Hv{hv}-K{k}-V{v}" for b, t, hk, hv, k, v in CASES]
TOL = 1e-5


make_hooks = random_hooks  # q, k [B, T, Hk, K], v [B, T, Hv, V], beta, g [B, T, Hv]


def all_positions(B, T):
    """Every (row, t) pair, ``[B * T, 2]``."""
    return torch.cartesian_prod(torch.arange(B), torch.arange(T))


def max_rel(a, b):
    """Largest per-state ``||a - b|| / ||b||`` over ``[n, H, K, V]``."""
    a, b = a.double().flatten(2), b.double().flatten(2)
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def case(request):
    """Hooks, every position, and the float64 naive states there (computed once per case)."""
    B, T, Hk, Hv, K, V = request.param
    q, k, v, beta, g = make_hooks(B, T, Hk, Hv, K, V)
    pos = all_positions(B, T)
    return types.SimpleNamespace(q=q, k=k, v=v, beta=beta, g=g, pos=pos,
                                 naive=snapshot_states_naive(k, v, beta, g, pos, precision="float64"))


# ---------------------------------------------------------------- fast vs naive


@pytest.mark.parametrize("chunk_size", [64, 16, 7])
def test_fast_equals_naive_at_every_position(case, chunk_size):
    fast = snapshot_states(case.k, case.v, case.beta, case.g, case.pos, chunk_size=chunk_size)
    assert fast.dtype == torch.float32 and fast.shape == case.naive.shape
    assert max_rel(fast, case.naive) <= TOL


def test_fast_keeps_the_order_of_positions(case):
    B, T = case.k.shape[:2]
    pos = torch.tensor([[B - 1, T - 1], [0, 64], [0, 0], [B - 1, 63], [0, 64], [0, 1]])
    fast = snapshot_states(case.k, case.v, case.beta, case.g, pos)
    want = case.naive[pos[:, 0] * T + pos[:, 1]]
    assert max_rel(fast, want) <= TOL


def test_naive_float32_close_to_float64(case):
    naive32 = snapshot_states_naive(case.k, case.v, case.beta, case.g, case.pos)
    assert naive32.dtype == torch.float32
    assert max_rel(naive32, case.naive) <= TOL


def test_no_positions_gives_empty():
    q, k, v, beta, g = make_hooks(1, 10, 1, 2, 4, 3)
    none = torch.zeros(0, 2, dtype=torch.long)
    assert snapshot_states(k, v, beta, g, none).shape == (0, 2, 4, 3)
    assert snapshot_states_naive(k, v, beta, g, none).shape == (0, 2, 4, 3)


@pytest.mark.parametrize("bad", [[[0, 10]], [[1, 0]], [[0, -1]], [0, 1], [[0.0, 1.0]]])
def test_bad_positions_refused(bad):
    q, k, v, beta, g = make_hooks(1, 10, 1, 2, 4, 3)
    for fn in (snapshot_states, snapshot_states_naive):
        with pytest.raises(ValueError):
            fn(k, v, beta, g, torch.tensor(bad))


def test_bad_shapes_refused():
    q, k, v, beta, g = make_hooks(1, 10, 2, 4, 4, 3)
    pos = torch.tensor([[0, 1]])
    for fn in (snapshot_states, snapshot_states_naive):
        with pytest.raises(ValueError):
            fn(torch.randn(1, 10, 3, 4), v, beta, g, pos)  # Hv = 4 not a multiple of Hk = 3
        with pytest.raises(ValueError):
            fn(k, v, beta[:, :9], g, pos)


# ---------------------------------------------------------------- independent anchors


def test_naive_equals_transformer_lens_scan(case):
    """TL's eager scan takes GQA-expanded q/k; it is an instance method that reads only ``self._l2norm``
    (and ``self.hook_ssm_state`` when firing hooks), so a stub ``self`` serves."""
    Hv = case.v.shape[2]
    stub = types.SimpleNamespace(_l2norm=GatedDeltaNetBridge._l2norm, hook_ssm_state=lambda x: x)
    q, k = (expand_kv_heads(x, Hv) for x in (case.q, case.k))
    traj, _ = GatedDeltaNetBridge._gated_delta_scan(stub, q, k, case.v, case.g, case.beta, fire_hook=False)
    tl = traj[case.pos[:, 0], case.pos[:, 1]]  # [n, Hv, K, V]
    assert max_rel(tl, case.naive) <= TOL


def test_fast_states_give_transformers_outputs_and_final_state(case):
    """o_t = S_t^T q~_t is the layer's recurrence output; transformers' final state is S_{T-1}."""
    B, T, _, K = case.q.shape
    Hv = case.v.shape[2]
    q, k = (expand_kv_heads(x, Hv) for x in (case.q, case.k))
    out, final = torch_recurrent_gated_delta_rule(q, k, case.v, case.g, case.beta, initial_state=None,
                                                  output_final_state=True, use_qk_l2norm_in_kernel=True)
    fast = snapshot_states(case.k, case.v, case.beta, case.g, case.pos)
    qn = l2norm(q.double())[case.pos[:, 0], case.pos[:, 1]] / K**0.5  # [n, Hv, K]
    o = torch.einsum("nhkv,nhk->nhv", fast.double(), qn)
    want = out[case.pos[:, 0], case.pos[:, 1]].double()  # [n, Hv, V]
    assert ((o - want).norm(dim=-1) / want.norm(dim=-1)).max().item() <= 1e-4  # float32 anchor
    last = snapshot_states(case.k, case.v, case.beta, case.g, torch.tensor([[b, T - 1] for b in range(B)]))
    assert max_rel(last, final) <= TOL


# ---------------------------------------------------------------- batching and early stop


def test_batch_equals_each_row_alone():
    q, k, v, beta, g = make_hooks(3, 150, 2, 8, 16, 24, seed=1)
    wanted = {0: [5, 100], 1: [149], 2: [0, 63, 64]}
    pos = torch.tensor([[b, t] for b, ts in wanted.items() for t in ts])
    together = snapshot_states(k, v, beta, g, pos)
    i = 0
    for b, ts in wanted.items():
        row = torch.tensor([[0, t] for t in ts])
        alone = snapshot_states(k[b:b + 1], v[b:b + 1], beta[b:b + 1], g[b:b + 1], row)
        torch.testing.assert_close(together[i:i + len(ts)], alone, rtol=1e-6, atol=1e-6)
        i += len(ts)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest storage any op creates; views into the given inputs' storage do not count."""

    def __init__(self, *inputs):
        super().__init__()
        self.inputs = {x.untyped_storage().data_ptr() for x in inputs}
        self.largest = 0

    def __torch_dispatch__(self, func, _types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in self.inputs:
                self.largest = max(self.largest, x.untyped_storage().nbytes())
        return out


def _overlapping_windows(gen, *shape, fn=lambda x: x):
    """``[1, T, *rest]`` whose token t is a window of one random buffer (mapped by ``fn``) starting at t:
    every token differs, yet the whole takes only T + prod(rest) floats, so T can be huge."""
    T, rest = shape[1], shape[2:]
    width = int(torch.tensor(rest).prod())
    buf = fn(torch.randn(T + width, generator=gen))
    strides = [1] * len(rest)
    for d in range(len(rest) - 2, -1, -1):
        strides[d] = strides[d + 1] * rest[d + 1]
    return buf.as_strided((1, T, *rest), (0, 1, *strides))


def test_small_positions_never_touch_the_rest_of_a_huge_sequence():
    """T = 2 million: one [T, Hv, K, V] state trajectory would be ~12 GB, even one normalised copy of k
    256 MB. The requested states only need the first chunk, so nothing near that size may be made."""
    T, Hk, Hv, K, V = 2_000_000, 2, 8, 16, 24
    gen = torch.Generator().manual_seed(2)
    k = _overlapping_windows(gen, 1, T, Hk, K)
    v = _overlapping_windows(gen, 1, T, Hv, V)
    beta = _overlapping_windows(gen, 1, T, Hv, fn=torch.sigmoid)
    g = _overlapping_windows(gen, 1, T, Hv, fn=lambda x: -F.softplus(x))
    pos = torch.tensor([[0, 3], [0, 40]])
    with _LargestAllocation(k, v, beta, g) as alloc:
        fast = snapshot_states(k, v, beta, g, pos)
    assert alloc.largest < 1 << 20, alloc.largest  # one chunk: 64 * 8 * (16 + 24) floats ~ 80 KB
    short = slice(0, 41)
    naive = snapshot_states_naive(k[:, short], v[:, short], beta[:, short], g[:, short], pos, precision="float64")
    assert max_rel(fast, naive) <= TOL


# ---------------------------------------------------------------- statistics


def test_statistics_fast_equals_naive(case):
    fast = snapshot_states(case.k, case.v, case.beta, case.g, case.pos[::7])
    norm, erank = state_statistics(fast)
    norm_ref, erank_ref = state_statistics_naive(fast)
    assert norm.dtype == erank.dtype == torch.float32 and norm.shape == fast.shape[:2]
    torch.testing.assert_close(norm.double(), norm_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(erank.double(), erank_ref, rtol=1e-4, atol=1e-4)
    assert (erank_ref >= 1).all() and (erank_ref <= min(fast.shape[-2:])).all()


@pytest.mark.parametrize("stats", [state_statistics, state_statistics_naive], ids=["fast", "naive"])
def test_statistics_of_known_matrices(stats):
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(16, generator=gen), torch.randn(24, generator=gen)
    two = torch.zeros(16, 24)
    two[0, 0] = two[1, 1] = 2.0
    known = torch.stack([
        torch.outer(a, b),  # rank 1
        torch.eye(16, 24) * 3,  # identity-like: 16 equal singular values
        torch.zeros(16, 24),
        two,  # rank 2, equal singular values
    ])[None]  # [1, 4, 16, 24]
    norm, erank = stats(known)
    torch.testing.assert_close(norm[0].double(), torch.linalg.matrix_norm(known[0].double()), rtol=1e-6, atol=0)
    torch.testing.assert_close(erank[0].double(), torch.tensor([1.0, 16.0, 0.0, 2.0], dtype=torch.float64),
                               rtol=0, atol=1e-3)
    assert erank[0, 2] == 0 and norm[0, 2] == 0  # exactly, not nan
