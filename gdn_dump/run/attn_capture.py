"""Attention matrices from a forward: exact (or heuristic) GDN effective attention, softmax patterns.

For every selected layer the store gets ``blocks.<i>.attn_matrix`` ``[n_prompts, heads, L_max, L_max]``
(DESIGN.md section 4). The GDN matrices are computed from the same forward's ``hook_q``, ``hook_k``,
``hook_beta`` and ``hook_log_decay`` (:mod:`gdn_dump.attention`), and checked on every prompt against
that forward's ``hook_v`` and ``hook_recurrence_out``: ``||M V - o|| / ||o||``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..ops.attention import (expand_kv_heads, gdn_effective_attention, gdn_effective_attention_rows,
                             heuristic_effective_attention, relative_residual)
from ..catalogue import GDN, MATRIX_METHODS, MATRIX_MODES, MatrixSpec, attention_hook_name, gdn_hook_name
from ..dtypes import PRECISIONS, check
from ..store.layout import ATTENTION_TILE

_GDN_INPUTS = ("q", "k", "beta", "log_decay", "v", "recurrence_out")
ROW_CHUNK = 64  # the chunk of gdn_effective_attention_rows


def block_rows(plan) -> int:
    """Query rows per block of every matrix of ``plan``: whole tiles of the store (so a tile is
    written by one block only), a multiple of the exact kernel's chunk."""
    tile = max([a.chunks[2] for a in plan.arrays if a.stream is None] or [ATTENTION_TILE])
    return -(-tile // ROW_CHUNK) * ROW_CHUNK


def hooks_for(layers: list[MatrixSpec]) -> list[str]:
    """The hooks a forward must keep for ``layers``' matrices."""
    names = []
    for a in layers:
        if a.layer_type == GDN:
            names += [gdn_hook_name(a.layer, short) for short in _GDN_INPUTS]
        else:
            names.append(attention_hook_name(a.layer, "hook_pattern"))
    return names


def check_attention_options(mode: str, method: str, precision: str) -> None:
    check("--mode", mode, MATRIX_MODES)
    check("--method", method, MATRIX_METHODS)
    check("--precision", precision, PRECISIONS)


class AttentionCapture:
    """Keeps the hook tensors the matrices need during a forward, then computes the matrices."""

    def __init__(self, layers: list[MatrixSpec], *, mode: str = "exact", method: str = "chunked",
                 precision: str = "float32", rows: int = ATTENTION_TILE):
        check_attention_options(mode, method, precision)
        self.layers = layers
        self.mode, self.method, self.precision = mode, method, precision
        self.rows = rows  # query rows per block: see block_rows
        self._kept: dict[str, torch.Tensor] = {}

    @property
    def forward_layers(self) -> list[int]:
        return [a.layer for a in self.layers]

    def fwd_hooks(self):
        def keep(tensor: torch.Tensor, hook) -> None:
            self._kept[hook.name] = tensor
        return [(name, keep) for name in hooks_for(self.layers)]

    def reset(self) -> None:
        self._kept = {}

    def finish(self, lengths: list[int], input_ids=None) -> dict[str, list[PromptMatrix]]:
        """Each selected layer's matrix for each prompt of the batch, as row blocks.

        Exact GDN matrices (the chunked method) are computed as they are read, a block of query
        rows at a time (:func:`gdn_effective_attention_rows`): memory is the layer's state and one
        block, linear in the prompt's length, and the residual is summed block by block. Softmax
        patterns, heuristic and closed-form matrices are whole ``[heads, n, n]`` matrices cut
        into the same blocks. Nothing runs past a prompt's own rows (no work on padding).
        """
        matrices: dict[str, list[PromptMatrix]] = {}
        kept, self._kept = self._kept, {}
        for a in self.layers:
            if a.layer_type != GDN:
                pattern = kept[attention_hook_name(a.layer, "hook_pattern")][:, list(a.heads)]
                matrices[a.name] = [PromptMatrix.whole(pattern[b, :, :n, :n].float().cpu().numpy(),
                                                       self.rows)
                                    for b, n in enumerate(lengths)]
                continue
            matrices[a.name] = [self._gdn(a, kept, b, n) for b, n in enumerate(lengths)]
        return matrices

    def _gdn(self, a: MatrixSpec, kept, b: int, n: int) -> PromptMatrix:
        q, k, beta, g, v, out = (kept[gdn_hook_name(a.layer, h)][b:b + 1, :n] for h in _GDN_INPUTS)
        heads = list(a.heads)
        n_v = beta.shape[-1]
        q, k = expand_kv_heads(q, n_v)[:, :, heads], expand_kv_heads(k, n_v)[:, :, heads]
        beta, g, v, out = beta[:, :, heads], g[:, :, heads], v[:, :, heads], out[:, :, heads]
        if self.mode == "heuristic":
            return PromptMatrix.whole(heuristic_effective_attention(q, k, beta, g)[0].cpu().numpy(),
                                      self.rows)
        if self.method != "chunked":
            M = gdn_effective_attention(q, k, beta, g, method=self.method, precision=self.precision)
            return PromptMatrix.whole(M[0].float().cpu().numpy(), self.rows,
                                      float(relative_residual(M, v, out)[0]))
        blocks = gdn_effective_attention_rows(q, k, beta, g, precision=self.precision, rows=self.rows)
        return PromptMatrix(blocks, v[0].transpose(0, 1), out[0].transpose(0, 1))


class PromptMatrix:
    """One prompt's ``[heads, n, n]`` matrix as row blocks ``(top, block [heads, r, top + r])``
    (float32, host), read once by :meth:`blocks`; for an exact GDN matrix checked against the
    layer's output as it goes: :attr:`residual` is ``||M V - o|| / ||o||`` once every block is read
    (None for matrices without a check)."""

    def __init__(self, blocks, v=None, out=None, residual: float | None = None):
        self._blocks, self._v, self._out = blocks, v, out  # v, out: [heads, n, d_v] (a check)
        self.residual = residual

    @classmethod
    def whole(cls, matrix: np.ndarray, rows: int, residual: float | None = None) -> PromptMatrix:
        n = matrix.shape[-1]
        return cls(((top, matrix[:, top:top + rows, :min(top + rows, n)]) for top in range(0, n, rows)),
                   residual=residual)

    def pieces(self, name: str):
        """``(name, top, heads, block)`` for the writer's ``write_matrix_rows`` (every head at
        once), from :meth:`blocks`."""
        for top, block in self.blocks():
            yield name, top, slice(None), block

    def blocks(self):
        """Yields each block once; computes (and checks) them on the thread that reads them."""
        num = den = 0.0
        with torch.inference_mode():  # thread-local: the sink thread reads these
            for top, block in self._blocks:
                if self._v is not None:
                    r = block.shape[1]
                    mv = block.to(torch.float64) @ self._v[:, :top + r].to(torch.float64)
                    o = self._out[:, top:top + r].to(torch.float64)
                    num += float(torch.linalg.vector_norm(mv - o)) ** 2
                    den += float(torch.linalg.vector_norm(o)) ** 2
                    block = block.float().cpu().numpy()
                yield top, block
        if self._v is not None:
            self.residual = norm_ratio(num, den)


def norm_ratio(num: float, den: float) -> float:
    """``sqrt(num / den)`` (squared norms in) as :func:`relative_residual` words it: 0 for 0 / 0, inf for x / 0."""
    if den > 0:
        return math.sqrt(num / den)
    return 0.0 if num == 0 else math.inf
