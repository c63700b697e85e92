"""Tests for gdn_dump.attention: exact GDN effective attention and the TL heuristic (CPU, seconds).

Three independent anchors hold the fast paths in place:
- transformers' ``torch_recurrent_gated_delta_rule`` (the model's own recurrence; float32 only),
- its float64 twin ``gated_delta_rule_recurrent_naive`` (checked bit for bit against it in float32),
- TransformerLens's ``compute_effective_attention`` for the heuristic (bit for bit).
"""

from __future__ import annotations

import pytest
import torch
from transformer_lens.model_bridge.generalized_components.gated_delta_net import GatedDeltaNetBridge
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

from gdn_dump.catalogue import MATRIX_METHODS
from gdn_dump.ops import attention
from gdn_dump.ops.attention import (
    expand_kv_heads,
    gdn_effective_attention,
    heuristic_effective_attention,
    relative_residual,
)
from gdn_dump.ops.attention_reference import (
    gated_delta_rule_recurrent_naive,
    gdn_effective_attention_inverse_naive,
    gdn_effective_attention_naive,
)

from .random_hooks import random_hooks

# (B, T, Hk, Hv): GQA ratios 1, 2 and 4; T below, between and above multiples of 64.
CASES = [(1, 37, 2, 4), (2, 100, 1, 4), (1, 130, 2, 4), (1, 130, 2, 2)]
CASE_IDS = [f"B{b}-T{t}-Hk{hk}-Hv{hv}" for b, t, hk, hv in CASES]
K, DV = 64, 16


def make_hooks(B, T, Hk, Hv, **options):
    """Random hook tensors with this module's K and DV (see :func:`random_hooks`)."""
    return random_hooks(B, T, Hk, Hv, K, DV, **options)


def hf_recurrence(q, k, v, beta, g):
    """transformers' reference (always in float32). q/k are GQA-expanded here as the model does
    (newer transformers also expand inside the function; older ones expect it done)."""
    groups = v.shape[2] // q.shape[2]
    q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
    out, state = torch_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=True
    )
    assert state is None
    return out


def scaled_max_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------- against the model's recurrence


def test_float64_twin_is_transformers_recurrence_bit_for_bit():
    q, k, v, beta, g = make_hooks(2, 70, 2, 4)
    assert torch.equal(gated_delta_rule_recurrent_naive(q, k, v, g, beta), hf_recurrence(q, k, v, beta, g))


@pytest.mark.parametrize("method", MATRIX_METHODS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_reproduces_transformers_recurrence(case, method):
    q, k, v, beta, g = make_hooks(*case)
    M = gdn_effective_attention(q, k, beta, g, method=method, precision="float32", chunk_size=32)
    assert M.shape == (case[0], case[3], case[1], case[1]) and M.dtype == torch.float32
    assert relative_residual(M, v, hf_recurrence(q, k, v, beta, g)).max() < 1e-5


@pytest.mark.parametrize("method", MATRIX_METHODS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float64_reproduces_float64_recurrence(case, method):
    q, k, v, beta, g = make_hooks(*case, dtype=torch.float64)
    M = gdn_effective_attention(q, k, beta, g, method=method, precision="float64", chunk_size=32)
    assert M.dtype == torch.float64
    reference = gated_delta_rule_recurrent_naive(q, k, v, g, beta, precision="float64")
    assert relative_residual(M, v, reference).max() < 1e-10
    assert relative_residual(M, v, reference, per_head=True).max() < 1e-10


# ---------------------------------------------------------------- the methods agree with each other


@pytest.mark.parametrize("chunk_size", [16, 64, 200])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_chunked_equals_closed_form(case, chunk_size):
    q, k, _, beta, g = make_hooks(*case, dtype=torch.float64, seed=1)
    for precision, tol in [("float64", 1e-12), ("float32", 2e-6)]:
        closed = gdn_effective_attention(q, k, beta, g, method="closed_form", precision=precision)
        chunked = gdn_effective_attention(q, k, beta, g, method="chunked", precision=precision,
                                          chunk_size=chunk_size)
        assert scaled_max_err(chunked, closed) < tol, precision


@pytest.mark.parametrize("T, chunk_size", [(64, 64), (128, 32), (128, 64), (1, 16), (17, 16)])
def test_chunked_at_and_around_chunk_multiples(T, chunk_size):
    q, k, v, beta, g = make_hooks(1, T, 2, 4, dtype=torch.float64, seed=7)
    chunked = gdn_effective_attention(q, k, beta, g, method="chunked", precision="float64", chunk_size=chunk_size)
    reference = gated_delta_rule_recurrent_naive(q, k, v, g, beta, precision="float64")
    assert relative_residual(chunked, v, reference).max() < 1e-12
    assert torch.count_nonzero(torch.triu(chunked, diagonal=1)) == 0


@pytest.mark.parametrize("case", CASES[:3], ids=CASE_IDS[:3])
def test_naive_references_equal_closed_form(case):
    q, k, _, beta, g = make_hooks(*case, seed=2)
    closed = gdn_effective_attention(q, k, beta, g, precision="float64")
    assert scaled_max_err(gdn_effective_attention_naive(q, k, beta, g, "float64"), closed) < 1e-12
    assert scaled_max_err(gdn_effective_attention_inverse_naive(q, k, beta, g, "float64"), closed) < 1e-12
    closed32 = gdn_effective_attention(q, k, beta, g, precision="float32")
    assert scaled_max_err(gdn_effective_attention_naive(q, k, beta, g, "float32"), closed32) < 2e-6


def test_input_dtype_does_not_matter_precision_does():
    q, k, _, beta, g = make_hooks(1, 50, 2, 4)
    ref = gdn_effective_attention(q, k, beta, g, precision="float64")
    for method in MATRIX_METHODS:
        from_bf16 = gdn_effective_attention(*(x.bfloat16() for x in (q, k, beta, g)), method=method)
        assert from_bf16.dtype == torch.float32 and torch.isfinite(from_bf16).all()
        assert gdn_effective_attention(q.double(), k.double(), beta, g, method=method).dtype == torch.float32
        assert scaled_max_err(gdn_effective_attention(q, k, beta, g, method=method), ref) < 2e-6


# ---------------------------------------------------------------- structure and numerical safety


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("method", MATRIX_METHODS)
def test_upper_triangle_is_exactly_zero(method, precision):
    q, k, _, beta, g = make_hooks(2, 100, 2, 4)
    M = gdn_effective_attention(q, k, beta, g, method=method, precision=precision, chunk_size=32)
    assert torch.count_nonzero(torch.triu(M, diagonal=1)) == 0
    assert torch.count_nonzero(torch.diagonal(M, dim1=-2, dim2=-1)) > 0


@pytest.mark.parametrize("method", MATRIX_METHODS)
def test_very_strong_decay_stays_finite_and_exact(method):
    q, k, v, beta, g = make_hooks(1, 130, 2, 4, g_spread=3.0, seed=3)
    g[0, 40:45] = -1e4  # near-total forgetting: |G| ~ 5e4, exp(+5e4) above the diagonal is inf
    assert g.double().sum(1).min() < -4e4
    M = gdn_effective_attention(q, k, beta, g, method=method, chunk_size=32)
    assert torch.isfinite(M).all()
    assert relative_residual(M, v, hf_recurrence(q, k, v, beta, g)).max() < 1e-5
    # nothing before the wipe-out reaches past it
    assert torch.count_nonzero(M[0, :, 45:, :40]) == 0


@pytest.mark.parametrize("method", MATRIX_METHODS)
def test_float32_keeps_accuracy_when_cumulative_decay_is_large(method):
    """After a strongly decaying stretch, G is ~ -1e4; float32 G_i - G_j would lose ~1e-3 there."""
    q, k, _, beta, g = make_hooks(1, 160, 1, 2, seed=4)
    g[:, :60] = -200.0
    g[:, 60:] = -0.05
    M64 = gdn_effective_attention(q, k, beta, g, precision="float64")
    M32 = gdn_effective_attention(q, k, beta, g, method=method, precision="float32", chunk_size=64)
    late = (slice(None), slice(None), slice(60, None), slice(60, None))  # the well-conditioned block
    assert scaled_max_err(M32[late], M64[late]) < 2e-6


def test_single_token_and_empty_prompt():
    q, k, _, beta, g = make_hooks(1, 1, 2, 4)
    for method in MATRIX_METHODS:
        M = gdn_effective_attention(q, k, beta, g, method=method, precision="float64")
        qn, kn = (attention.l2norm(x.double()) for x in (q, k))
        expected = beta.double()[0, 0] * expand_kv_heads((qn * kn).sum(-1), 4)[0, 0] / K**0.5
        torch.testing.assert_close(M[0, :, 0, 0], expected, rtol=1e-12, atol=0)
        assert gdn_effective_attention(q[:, :0], k[:, :0], beta[:, :0], g[:, :0], method=method).shape == (1, 4, 0, 0)


# ---------------------------------------------------------------- fla plumbing (fla itself is not installed)


def test_fla_path_layout_with_a_stand_in_kernel(monkeypatch):
    """Feed the fla path transformers' generic chunk kernel (same call signature) to check the plumbing."""
    monkeypatch.setattr(attention, "_fla_kernel_for", lambda q, dtype: torch_chunk_gated_delta_rule)
    q, k, v, beta, g = make_hooks(2, 100, 2, 4)
    M = gdn_effective_attention(q, k, beta, g, method="chunked", use_fla=True)
    assert M.shape == (2, 4, 100, 100) and M.is_contiguous()
    assert relative_residual(M, v, hf_recurrence(q, k, v, beta, g)).max() < 1e-5
    assert torch.count_nonzero(torch.triu(M, diagonal=1)) == 0


def test_fla_refusing_float32_falls_back_to_torch(monkeypatch):
    def refuses(*args, **kwargs):
        raise AssertionError("ChunkGatedDeltaRuleFunction does not support float32. Please use bfloat16.")

    monkeypatch.setattr(attention, "_fla_kernel_for", lambda q, dtype: refuses)
    q, k, _, beta, g = make_hooks(1, 37, 2, 4)
    torch.testing.assert_close(gdn_effective_attention(q, k, beta, g, method="chunked", use_fla=True),
                               gdn_effective_attention(q, k, beta, g, method="closed_form"))


def test_fla_is_opt_in(monkeypatch):
    """fla's float32 kernel runs in TF32 (~1e-3 off on an H100), so the exact default never asks for it."""
    def must_not_be_asked(q, dtype):
        raise AssertionError("fla asked for without use_fla=True")

    monkeypatch.setattr(attention, "_fla_kernel_for", must_not_be_asked)
    q, k, _, beta, g = make_hooks(1, 37, 2, 4)
    gdn_effective_attention(q, k, beta, g, method="chunked")


def test_fla_is_not_used_on_cpu_or_in_float64():
    assert attention._fla_kernel_for(torch.zeros(1), torch.float32) is None
    assert attention._fla_kernel_for(torch.zeros(1), torch.float64) is None


# ---------------------------------------------------------------- the TransformerLens heuristic


def tl_heuristic(q, k, beta, g, layer=3):
    prefix = f"blocks.{layer}.linear_attn"
    cache = {f"{prefix}.hook_q": q, f"{prefix}.hook_k": k, f"{prefix}.hook_beta": beta,
             f"{prefix}.hook_log_decay": g}
    return GatedDeltaNetBridge.compute_effective_attention(None, cache, layer)  # self is unused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_heuristic_is_transformer_lens_bit_for_bit(case, dtype):
    q, k, _, beta, g = make_hooks(*case, dtype=dtype, seed=5)
    ours = heuristic_effective_attention(q, k, beta, g)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, tl_heuristic(q, k, beta, g))


def test_heuristic_is_not_exact():
    q, k, v, beta, g = make_hooks(1, 100, 2, 4, seed=6)
    assert relative_residual(heuristic_effective_attention(q, k, beta, g), v, hf_recurrence(q, k, v, beta, g)) > 0.1


# ---------------------------------------------------------------- helpers


def test_relative_residual_values_and_shapes():
    q, k, v, beta, g = make_hooks(2, 40, 2, 4, dtype=torch.float64)
    M = gdn_effective_attention(q, k, beta, g, precision="float64")
    o = torch.matmul(M, v.transpose(1, 2)).transpose(1, 2)  # [B, T, Hv, DV]
    per_prompt = relative_residual(M, v, o)
    per_head = relative_residual(M, v, o, per_head=True)
    assert per_prompt.shape == (2,) and per_head.shape == (2, 4) and per_prompt.dtype == torch.float64
    assert per_prompt.max() < 1e-14
    torch.testing.assert_close(relative_residual(M, v, 2 * o), torch.full((2,), 0.5, dtype=torch.float64))
    zero_o = torch.zeros_like(o)
    assert relative_residual(torch.zeros_like(M), v, zero_o).tolist() == [0.0, 0.0]
    assert torch.isinf(relative_residual(M, v, zero_o)).all()


def test_expand_kv_heads_is_repeat_interleave():
    x = torch.arange(2 * 3 * 2 * 5.0).view(2, 3, 2, 5)
    assert torch.equal(expand_kv_heads(x, 6), x.repeat_interleave(3, dim=2))
    assert expand_kv_heads(x, 2) is x
    assert torch.equal(expand_kv_heads(x, 6)[:, :, 4], x[:, :, 1])  # value head 4 reads key head 4 // 3
    with pytest.raises(ValueError, match="multiple"):
        expand_kv_heads(x, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"method": "inverse"}, "method"), ({"precision": "bfloat16"}, "precision"),
     ({"chunk_size": 0}, "chunk_size"), ({"method": "chunked", "chunk_size": 8.0}, "chunk_size")],
)
def test_bad_arguments_raise(kwargs, match):
    q, k, _, beta, g = make_hooks(1, 5, 2, 4)
    with pytest.raises(ValueError, match=match):
        gdn_effective_attention(q, k, beta, g, **kwargs)


def test_bad_shapes_raise():
    q, k, _, beta, g = make_hooks(1, 5, 2, 4)
    with pytest.raises(ValueError, match="multiple"):
        gdn_effective_attention(q, k, beta[..., :3], g[..., :3])
    with pytest.raises(ValueError, match="q and k"):
        gdn_effective_attention(q, k[:, :4], beta, g)
    with pytest.raises(ValueError, match="beta and g"):
        gdn_effective_attention(q, k, beta, g[:, :4])
