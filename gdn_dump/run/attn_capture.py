"""Attention matrices from a forward: exact (or heuristic) GDN effective attention, softmax patterns.

For every selected layer the store gets ``blocks.<i>.attn_matrix`` ``[n_prompts, heads, L_max, L_max]``
(DESIGN.md section 4). The GDN matrices are computed from the same forward's ``hook_q``, ``hook_k``,
``hook_beta`` and ``hook_log_decay`` (:mod:`gdn_dump.attention`), and checked on every prompt against
that forward's ``hook_v`` and ``hook_recurrence_out``: ``||M V - o|| / ||o||``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ops.attention import expand_kv_heads, gdn_effective_attention, heuristic_effective_attention, relative_residual
from ..catalogue import GDN, MATRIX_METHODS, MATRIX_MODES, MatrixSpec, attention_hook_name, gdn_hook_name
from ..dtypes import PRECISIONS, check

_GDN_INPUTS = ("q", "k", "beta", "log_decay", "v", "recurrence_out")


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
                 precision: str = "float32"):
        check_attention_options(mode, method, precision)
        self.layers = layers
        self.mode, self.method, self.precision = mode, method, precision
        self._kept: dict[str, torch.Tensor] = {}

    def fwd_hooks(self):
        def keep(tensor: torch.Tensor, hook) -> None:
            self._kept[hook.name] = tensor
        return [(name, keep) for name in hooks_for(self.layers)]

    def reset(self) -> None:
        self._kept = {}

    def finish(self, lengths: list[int]) -> tuple[dict[str, list[np.ndarray]], dict[str, list[float]]]:
        """Matrices ``[heads, n, n]`` per prompt of the batch, and residuals per GDN layer.

        GDN matrices are computed prompt by prompt on the prompt's own rows: memory is bounded by
        one prompt's ``heads x L^2``, and no work is spent on padding.
        """
        matrices: dict[str, list[np.ndarray]] = {}
        residuals: dict[str, list[float]] = {}
        kept, self._kept = self._kept, {}
        for a in self.layers:
            if a.layer_type != GDN:
                pattern = kept[attention_hook_name(a.layer, "hook_pattern")][:, list(a.heads)]
                matrices[a.name] = [pattern[b, :, :n, :n].float().cpu().numpy()
                                    for b, n in enumerate(lengths)]
                continue
            matrices[a.name], res = [], []
            for b, n in enumerate(lengths):
                M, r = self._gdn(a, kept, b, n)
                matrices[a.name].append(M)
                res.append(r)
            if self.mode == "exact":
                residuals[a.name] = res
        return matrices, residuals

    def _gdn(self, a: MatrixSpec, kept, b: int, n: int) -> tuple[np.ndarray, float | None]:
        q, k, beta, g, v, out = (kept[gdn_hook_name(a.layer, h)][b:b + 1, :n] for h in _GDN_INPUTS)
        heads = list(a.heads)
        n_v = beta.shape[-1]
        q, k = expand_kv_heads(q, n_v)[:, :, heads], expand_kv_heads(k, n_v)[:, :, heads]
        beta, g, v, out = beta[:, :, heads], g[:, :, heads], v[:, :, heads], out[:, :, heads]
        if self.mode == "heuristic":
            return heuristic_effective_attention(q, k, beta, g)[0].cpu().numpy(), None
        M = gdn_effective_attention(q, k, beta, g, method=self.method, precision=self.precision)
        residual = float(relative_residual(M, v, out)[0])
        return M[0].float().cpu().numpy(), residual
