"""ops.contributions: the fast forms equal the loops of the reference, norms are the vectors'
norms, the contributions sum to the layer's output, and on the tiny model they reproduce the GDN
layer's hook_out of run_with_cache (issue 17, first step: the math)."""

from __future__ import annotations

import torch

from gdn_dump.ops.attention import expand_kv_heads, gdn_effective_attention
from gdn_dump.ops.contributions import (contribution_logits, contribution_norms, contribution_vectors,
                                        final_norm_unembed, gated_rmsnorm_gate, packed_gram, pair_order,
                                        pair_products, pair_rows, softmax_gate)
from gdn_dump.ops.contributions_reference import (contribution_logits_naive, contribution_norms_naive,
                                                  contribution_vectors_naive)


def random_layer(H=3, L=7, Dv=5, D=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(H, L, L, generator=gen, dtype=torch.float64).tril()
    v = torch.randn(L, H, Dv, generator=gen, dtype=torch.float64)
    gate = torch.randn(L, H, Dv, generator=gen, dtype=torch.float64)
    w_out = torch.randn(D, H * Dv, generator=gen, dtype=torch.float64)
    unembed = torch.randn(L, D, generator=gen, dtype=torch.float64)
    return M, v, gate, w_out, unembed


def test_fast_forms_equal_the_reference():
    M, v, gate, w_out, unembed = random_layer()
    vectors = contribution_vectors_naive(M, v, gate, w_out)
    torch.testing.assert_close(contribution_vectors(M, v, gate, w_out), vectors)
    torch.testing.assert_close(contribution_norms(M, v, gate, w_out), contribution_norms_naive(M, v, gate, w_out))
    torch.testing.assert_close(contribution_norms(M, v, gate, w_out), vectors.norm(dim=-1))
    torch.testing.assert_close(contribution_logits(M, v, gate, w_out, unembed),
                               contribution_logits_naive(M, v, gate, w_out, unembed))
    # blocks of query rows give the same norms
    torch.testing.assert_close(contribution_norms(M, v, gate, w_out, block_bytes=1),
                               contribution_norms_naive(M, v, gate, w_out))


def test_pair_products_cover_every_pair_once():
    """The cyclic order: every unordered pair (a <= b) once, for odd and even D, and the packed G
    gives the quadratic form."""
    for D in (1, 2, 3, 4, 5, 8, 128):
        a, b = pair_order(D)
        pairs = {(min(x, y), max(x, y)) for x, y in zip(a.tolist(), b.tolist())}
        assert len(a) == D * (D + 1) // 2 == len(pairs)
        x = torch.randn(2, 3, D, dtype=torch.float64)
        torch.testing.assert_close(pair_products(x)[..., :len(a)], x[..., a] * x[..., b])
        xt = x.transpose(1, 2)  # [2, D, 3]: the pairs along dim -2
        torch.testing.assert_close(pair_products(xt, dim=-2)[:, :len(a)], xt[:, a] * xt[:, b])
        w = torch.randn(7, 2 * D, dtype=torch.float64)
        G = w[:, :D].T @ w[:, :D]
        form = pair_products(x)[..., :len(a)] @ packed_gram(w, 2)[0]
        torch.testing.assert_close(form, torch.einsum("ina,ab,inb->in", x, G, x))


def test_rectangular_blocks_equal_the_square():
    """A block of R query rows against its top + R key columns (as the pipeline calls them) gives
    the square's rows, for even and odd Dv, in one block or in blocks of rows, columns and heads."""
    for Dv in (4, 5):
        M, v, gate, w_out, unembed = random_layer(H=3, L=9, Dv=Dv, D=6, seed=Dv)
        norms = contribution_norms_naive(M, v, gate, w_out)
        logits = contribution_logits_naive(M, v, gate, w_out, unembed)
        pair_bytes = pair_rows(Dv) * 8
        for top, R in ((0, 3), (3, 3), (6, 3), (2, 7)):
            C = top + R
            block = (M[:, top:C, :C], v[:C], gate[top:C])
            # 1 row, 1 column, 1 head at a time; up to 4 rows and 4 columns, 1 head; all rows and
            # columns, 2 heads (then 1); everything at once
            for block_bytes in (1, 4 * pair_bytes, 2 * C * pair_bytes, 1 << 30):
                torch.testing.assert_close(contribution_norms(*block, w_out, block_bytes=block_bytes),
                                           norms[:, top:C, :C])
            torch.testing.assert_close(contribution_logits(*block, w_out, unembed[top:C]), logits[:, top:C, :C])
        empty = contribution_norms(M[:, :0], v, gate[:0], w_out)  # no query rows
        assert empty.shape == (3, 0, 9)


def test_contributions_sum_to_the_layer_output():
    M, v, gate, w_out, _ = random_layer(seed=1)
    o = torch.einsum("hij,jhk->ihk", M, v)  # o_i = sum_j M[i, j] v_j
    out = (gate * o).reshape(o.shape[0], -1) @ w_out.T
    torch.testing.assert_close(contribution_vectors(M, v, gate, w_out).sum(dim=(0, 2)), out)


def test_softmax_gate_and_unembed_rows():
    gate = torch.randn(4, 2)
    assert torch.equal(softmax_gate(gate, 3)[..., 1], torch.sigmoid(gate))
    x, w_final, w_u = torch.randn(4, 6), torch.randn(6), torch.randn(10, 6)
    targets = torch.tensor([3, 1, 7, -1])
    rows = final_norm_unembed(x, w_final, w_u, targets, 1e-6)
    r = torch.rsqrt(x.pow(2).mean(-1) + 1e-6)
    torch.testing.assert_close(rows[0], r[0] * (1 + w_final) * w_u[3])
    assert torch.equal(rows[3], torch.zeros(6))


def test_tiny_gdn_layer_output_is_the_sum_of_its_contributions(tiny):
    """On the model: M from q, k, beta, g; v, z, o from run_with_cache; the gated RMSNorm's
    weight and out_proj from the checkpoint: the sum reproduces linear_attn.hook_out."""
    ids = torch.tensor([tiny.tokenizer("the gated delta rule writes and decays")["input_ids"]])
    with torch.inference_mode():
        _, cache = tiny.bridge.run_with_cache(ids, use_cache=False)
    name = "blocks.0.linear_attn."
    q, k = cache[name + "hook_q"], cache[name + "hook_k"]
    beta, g = cache[name + "hook_beta"], cache[name + "hook_log_decay"]
    M = gdn_effective_attention(q, k, beta, g, precision="float64")[0]  # [Hv, L, L]
    v = cache[name + "hook_v"][0].double()
    o = cache[name + "hook_recurrence_out"][0]
    z = cache[name + "hook_gate_input"][0]
    hf = tiny.bridge.original_model.model.layers[0].linear_attn  # its norm and out_proj weights
    gate = gated_rmsnorm_gate(o, z, hf.norm.weight, hf.norm.variance_epsilon).double()
    c = contribution_vectors(M.double(), expand_kv_heads(v[None], M.shape[0])[0], gate,
                             hf.out_proj.weight.double())
    out = cache[name + "hook_out"][0].double()
    error = (c.sum(dim=(0, 2)) - out).norm(dim=-1) / out.norm(dim=-1)
    assert error.max() < 1e-5, error
