"""Per-source-token contributions from a forward (``gdn-dump contributions``).

For every selected layer the store gets ``blocks.<i>.contribution_norm`` (and ``_logit``, and with
``--vectors`` ``contribution``) ``[n_prompts, heads, L_max, L_max(, d_model)]`` and the per-prompt
check ``blocks.<i>.contribution_residual`` (DESIGN.md section 4). The matrices come from the same
forward as in :mod:`.attn_capture` (a GDN layer's exact effective attention a block of query rows
at a time; a softmax layer's ``hook_pattern``), the gates from the layer's own hooks, the weights
from the model (:mod:`gdn_dump.model.weights`); the math is :mod:`gdn_dump.ops.contributions`.

Every block is checked as it is computed: the contributions summed over the sources, with the
layer's unselected heads' own outputs, must give the layer's ``hook_out``; the residual is
``max_i ||sum_{h,j} c_{h,i,j} - out_i|| / ||out_i||``.
"""

from __future__ import annotations

import torch

from ..catalogue import (CONTRIBUTION_LOGIT, CONTRIBUTION_VECTORS, GDN, LOGITS_NEXT, ContributionSpec,
                         attention_hook_name, block_hook_name, contribution_name, gdn_hook_name,
                         layer_of)
from ..dtypes import PRECISIONS, check
from ..model import weights
from ..ops.attention import expand_kv_heads, gdn_effective_attention_rows
from ..ops.contributions import (contribution_logits, contribution_norms, contribution_vectors,
                                 final_norm_unembed, gated_rmsnorm_gate, head_columns, head_weights,
                                 softmax_gate)
from ..store.layout import ATTENTION_TILE, vector_tile
from .attn_capture import norm_ratio

_GDN_INPUTS = ("q", "k", "beta", "log_decay", "v", "recurrence_out", "gate_input", "out")
_ATTENTION_INPUTS = ("hook_pattern", "hook_v", "hook_q_gate", "hook_out")
VECTOR_PIECE_BYTES = 64 << 20  # contribution vectors computed (and written) at once, per head


def hooks_for(layers: list[ContributionSpec]) -> list[str]:
    """The hooks a forward must keep for ``layers``' contributions."""
    names = []
    for c in layers:
        if c.layer_type == GDN:
            names += [gdn_hook_name(c.layer, short) for short in _GDN_INPUTS]
        else:
            names += [attention_hook_name(c.layer, suffix) for suffix in _ATTENTION_INPUTS]
        if c.logits is not None:
            names.append(final_norm_input(c))
    return list(dict.fromkeys(names))


def final_norm_input(c: ContributionSpec) -> str:
    """The hook holding the final norm's input: the last layer's ``hook_resid_post``."""
    return block_hook_name(c.final_layer, "hook_resid_post")


class ContributionCapture:
    """Keeps the hook tensors the contributions need during a forward, then computes them."""

    def __init__(self, layers: list[ContributionSpec], bridge, *, precision: str = "float32",
                 rows: int = ATTENTION_TILE, l_max: int = 0):
        check("--precision", precision, PRECISIONS)
        self.layers, self.precision, self.rows = layers, precision, rows
        self.l_max = l_max  # the store's L_max: the vectors' chunks (layout.vector_tile)
        self._weights = {c.layer: (weights.gdn_output(bridge, c.layer) if c.layer_type == GDN
                                   else weights.attention_output(bridge, c.layer)) for c in layers}
        self._unembed = weights.unembed(bridge) if any(c.logits is not None for c in layers) else None
        self._kept: dict[str, torch.Tensor] = {}

    @property
    def forward_layers(self) -> list[int]:
        return [x for c in self.layers for x in c.forward_layers]

    def fwd_hooks(self):
        def keeper(name: str):  # by the name asked for: the bridge's hook may carry an alias's
            def keep(tensor: torch.Tensor, hook) -> None:
                self._kept[name] = tensor
            return keep
        return [(name, keeper(name)) for name in hooks_for(self.layers)]

    def reset(self) -> None:
        self._kept = {}

    def finish(self, lengths: list[int], input_ids: torch.Tensor) -> dict[str, list[PromptContributions]]:
        """Each selected layer's contributions for each prompt of the batch (``input_ids``
        ``[B, T]``: the next tokens, the targets of ``--logits next``)."""
        kept, self._kept = self._kept, {}
        out: dict[str, list[PromptContributions]] = {}
        for c in self.layers:
            vectors = (c.d_model, self.l_max) if c.vectors else None
            out[c.name] = [PromptContributions(self._blocks(c, kept, b, n, input_ids[b, :n]), vectors)
                           for b, n in enumerate(lengths)]
        return out

    def _blocks(self, c: ContributionSpec, kept, b: int, n: int, tokens: torch.Tensor):
        """A :class:`_Block` per block of query rows of prompt ``b`` (``n`` tokens), lazily: GDN
        matrices are computed as they are read."""
        w = self._weights[c.layer]
        heads = list(c.heads)
        if c.layer_type == GDN:
            q, k, beta, g, v, o, z, out = (kept[gdn_hook_name(c.layer, h)][b:b + 1, :n] for h in _GDN_INPUTS)
            n_heads = beta.shape[-1]
            gate = gated_rmsnorm_gate(o[0], z[0], w.norm_weight, w.eps)  # [n, H, Dv], every head
            q, k = expand_kv_heads(q, n_heads)[:, :, heads], expand_kv_heads(k, n_heads)[:, :, heads]
            matrices = gdn_effective_attention_rows(q, k, beta[:, :, heads], g[:, :, heads],
                                                    precision=self.precision, rows=self.rows)
            v, o, out = v[0], o[0], out[0]
        else:
            name = lambda suffix: attention_hook_name(c.layer, suffix)  # noqa: E731
            every = kept[name("hook_pattern")][b, :, :n, :n].float()  # [H, n, n]
            n_heads = every.shape[0]
            v = expand_kv_heads(kept[name("hook_v")][b:b + 1, :n], n_heads)[0]
            head_dim = v.shape[-1]
            gate = softmax_gate(kept[name("hook_q_gate")][b, :n].reshape(n, n_heads, head_dim), head_dim)
            pattern = every[heads]
            # the heads' outputs before the gate (hook_z is not: it is TransformerLens's own)
            o = torch.einsum("hij,jhd->ihd", every, v.float()) if len(heads) < n_heads else None
            out = kept[name("hook_out")][b, :n]
            matrices = ((top, pattern[:, top:top + self.rows, :top + self.rows])
                        for top in range(0, n, self.rows))
        w_all = w.w_out.to(v.device)
        w_heads = head_columns(w_all, n_heads, heads)
        # the unselected heads are not decomposed: their own outputs join the sum that must give
        # hook_out (for a softmax layer, o is computed only when there are some)
        others = [h for h in range(n_heads) if h not in heads]
        w_others = head_columns(w_all, n_heads, others) if others else None
        v_sel, gate_sel = v[:, heads].float(), gate[:, heads]
        unembed = self._unembed_rows(c, kept, b, n, tokens) if c.logits is not None else None
        for top, M in matrices:
            r = M.shape[1]
            rows = slice(top, top + r)
            yield _Block(top, M.float(), v_sel[:top + r], gate_sel[rows], w_heads,
                         None if unembed is None else unembed[rows],
                         None if w_others is None else
                         (gate[rows, others] * o[rows, others].float()).reshape(r, -1) @ w_others.T,
                         out[rows])

    def _unembed_rows(self, c: ContributionSpec, kept, b: int, n: int, tokens: torch.Tensor):
        """``[n, d_model]``: each row's target unembedding through the frozen final norm."""
        u = self._unembed
        x = kept[final_norm_input(c)][b, :n]
        if c.logits == LOGITS_NEXT:
            targets = torch.cat([tokens[1:], tokens.new_full((1,), -1)])
        else:
            targets = tokens.new_full((n,), int(c.logits))
        return final_norm_unembed(x, u.norm_weight.to(x.device), u.w_u.to(x.device),
                                  targets.to(x.device, torch.long), u.eps)


class _Block:
    """One block of query rows ``top : top + r`` of one layer and prompt: ``M`` ``[heads, r, top + r]``,
    ``v`` ``[top + r, heads, Dv]``, ``gate`` ``[r, heads, Dv]``, ``w_out`` ``[d_model, heads Dv]``,
    ``unembed`` ``[r, d_model]`` or None, ``rest`` (unselected heads) and ``out`` ``[r, d_model]``."""

    def __init__(self, top, M, v, gate, w_out, unembed, rest, out):
        self.top, self.M, self.v, self.gate, self.w_out = top, M, v, gate, w_out
        self.unembed, self.rest, self.out = unembed, rest, out

    def residual(self) -> float:
        """``max_i ||sum_{h,j} c_{h,i,j} + rest_i - out_i|| / ||out_i||`` over the block's rows."""
        o = torch.einsum("hij,jhk->ihk", self.M.double(), self.v.double())  # [r, heads, Dv]
        total = (self.gate.double() * o).reshape(o.shape[0], -1) @ self.w_out.double().T
        if self.rest is not None:
            total = total + self.rest.double()
        out = self.out.double()
        num = torch.linalg.vector_norm(total - out, dim=-1).square().tolist()
        den = torch.linalg.vector_norm(out, dim=-1).square().tolist()
        return max(map(norm_ratio, num, den), default=0.0)

    def vectors(self, d_model: int, l_max: int):
        """``(top, heads, block [1, p, top + p, d_model])``, a head and a few rows at a time
        (``p``: a multiple of the vectors' chunk, about :data:`VECTOR_PIECE_BYTES`)."""
        r, C = self.M.shape[1], self.M.shape[2]
        tile = vector_tile(d_model, l_max)
        step = max(tile, VECTOR_PIECE_BYTES // max(4 * C * d_model, 1) // tile * tile)
        per_head = head_weights(self.w_out, self.M.shape[0])  # [heads, d_model, Dv]
        for h, w in enumerate(per_head):
            for lo in range(0, r, step):
                hi = min(lo + step, r)
                cols = self.top + hi
                c = contribution_vectors(self.M[h:h + 1, lo:hi, :cols], self.v[:cols, h:h + 1],
                                         self.gate[lo:hi, h:h + 1], w)
                yield self.top + lo, slice(h, h + 1), c


class PromptContributions:
    """One prompt's contributions of one layer as row blocks; :meth:`pieces` yields each array's
    blocks once (computed on the thread that reads them) and sets :attr:`residual`."""

    def __init__(self, blocks, vectors: tuple[int, int] | None = None):
        self._blocks = blocks
        self.vectors = vectors  # (d_model, L_max) when the vectors are stored
        self.residual: float | None = None

    def pieces(self, name: str):
        """``(array name, top, heads, block)`` of the layer whose norms are ``name``: float32 numpy
        blocks ``[heads, r, top + r(, d_model)]`` for the writer's ``write_matrix_rows``."""
        layer = layer_of(name)
        worst = 0.0
        with torch.inference_mode():  # thread-local: the sink thread reads these
            for block in self._blocks:
                worst = max(worst, block.residual())
                yield name, block.top, slice(None), _host(contribution_norms(
                    block.M, block.v, block.gate, block.w_out))
                if block.unembed is not None:
                    yield contribution_name(layer, CONTRIBUTION_LOGIT), block.top, slice(None), _host(
                        contribution_logits(block.M, block.v, block.gate, block.w_out, block.unembed))
                if self.vectors is not None:
                    for top, heads, c in block.vectors(*self.vectors):
                        yield contribution_name(layer, CONTRIBUTION_VECTORS), top, heads, _host(c)
        self.residual = worst


def _host(t: torch.Tensor):
    return t.float().cpu().numpy()
