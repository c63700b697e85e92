"""Attention matrices from a forward: exact (or heuristic) GDN effective attention, softmax patterns.

For every selected layer the store gets ``blocks.<i>.attn_matrix`` ``[n_prompts, heads, L_max, L_max]``
(DESIGN.md section 4). The GDN matrices are computed from the same forward's ``hook_q``, ``hook_k``,
``hook_beta`` and ``hook_log_decay`` (:mod:`gdn_dump.attention`), and checked on every prompt against
that forward's ``hook_v`` and ``hook_recurrence_out``: ``||M V - o|| / ||o||``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..ops.attention import expand_kv_heads, gdn_effective_attention, heuristic_effective_attention, relative_residual
from ..catalogue import GDN, Catalogue
from ..errors import GdnDumpError, SelectionError

MODES = ("exact", "heuristic")
# The chunked form is the default: measured faster than the closed form at every length on the
# CPU (benchmarks/bench_attn_cpu.txt: 0.6x at L=256, 0.19x at L=2048), and as exact.
METHODS = ("chunked", "closed_form")
RESIDUAL_LIMIT = 1e-3
KIND = {("gdn", "exact"): "gdn_exact", ("gdn", "heuristic"): "gdn_heuristic"}
_GDN_INPUTS = ("hook_q", "hook_k", "hook_beta", "hook_log_decay", "hook_v", "hook_recurrence_out")


@dataclass(frozen=True)
class AttnLayer:
    """One layer whose attention matrix is stored."""

    layer: int
    layer_type: str  # "gdn" | "attention"
    heads: tuple[int, ...]
    n_heads: int  # all heads of the layer

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.attn_matrix"

    @property
    def head_dim(self) -> str:
        full = "v_head" if self.layer_type == GDN else "attn_head"
        return full if len(self.heads) == self.n_heads else f"selected_{full}"

    def kind(self, mode: str) -> str:
        return KIND[("gdn", mode)] if self.layer_type == GDN else "softmax"


def select_attn_layers(catalogue: Catalogue, layers: str | None, heads: str | None,
                       option: str = "--attn-layers") -> list[AttnLayer]:
    """``--layer``/``--attn-layers`` (``all`` = every layer) and ``--heads`` (``all`` or a list)."""
    if layers is None or layers.strip() == "all":
        indices = list(range(len(catalogue.layer_types)))
    else:
        indices = catalogue.parse_layers(layers, option)
    out = []
    for layer in indices:
        kind = catalogue.layer_types[layer]
        n_heads = catalogue.sizes["v_head" if kind == GDN else "attn_head"]
        out.append(AttnLayer(layer, kind, tuple(_parse_heads(heads, n_heads, layer)), n_heads))
    if len({len(a.heads) for a in out if a.layer_type == GDN}) > 1 or len(
            {len(a.heads) for a in out if a.layer_type != GDN}) > 1:
        raise SelectionError("--heads must select the same number of heads in every layer")
    return out


def _parse_heads(text: str | None, n_heads: int, layer: int) -> list[int]:
    if text is None or text.strip() == "all":
        return list(range(n_heads))
    heads: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            lo, _, hi = part.partition("-")
            span = range(int(lo), int(hi or lo) + 1)
        except ValueError:
            raise SelectionError(f"--heads: cannot read {part!r}; use 'all' or a list like 0,2,5-7") from None
        for head in span:
            if not 0 <= head < n_heads:
                raise SelectionError(f"--heads: head {head} is out of range; layer {layer} has heads "
                                     f"0-{n_heads - 1}")
            if head not in heads:
                heads.append(head)
    if not heads:
        raise SelectionError("--heads selects no head")
    return heads


def check_budget(plan, max_bytes: int) -> None:
    """Refuse, before any model runs, a plan whose attention matrices exceed ``max_bytes``."""
    from ..store.layout import format_bytes

    if plan.matrix_bytes > max_bytes:
        raise GdnDumpError(
            f"the attention matrices need {format_bytes(plan.matrix_bytes)} ({plan.n_prompts} "
            f"prompts, longest {int(plan.prompt_lengths.max())} tokens), over --max-bytes "
            f"{format_bytes(max_bytes)}; select fewer layers, --heads, shorter --max-length, or "
            "raise --max-bytes"
        )


def hooks_for(layers: list[AttnLayer]) -> list[str]:
    names = []
    for a in layers:
        if a.layer_type == GDN:
            names += [f"blocks.{a.layer}.linear_attn.{h}" for h in _GDN_INPUTS]
        else:
            names.append(f"blocks.{a.layer}.attn.hook_pattern")
    return names


def check_attention_options(mode: str, method: str, precision: str) -> None:
    if mode not in MODES:
        raise GdnDumpError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    if method not in METHODS:
        raise GdnDumpError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if precision not in ("float32", "float64"):
        raise GdnDumpError(f"--precision must be float32 or float64, not {precision!r}")


class AttentionCapture:
    """Keeps the hook tensors the matrices need during a forward, then computes the matrices."""

    def __init__(self, layers: list[AttnLayer], *, mode: str = "exact", method: str = "chunked",
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
                pattern = kept[f"blocks.{a.layer}.attn.hook_pattern"][:, list(a.heads)]
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

    def _gdn(self, a: AttnLayer, kept, b: int, n: int) -> tuple[np.ndarray, float | None]:
        prefix = f"blocks.{a.layer}.linear_attn."
        q, k, beta, g, v, out = (kept[prefix + h][b:b + 1, :n] for h in _GDN_INPUTS)
        heads = list(a.heads)
        n_v = beta.shape[-1]
        q, k = expand_kv_heads(q, n_v)[:, :, heads], expand_kv_heads(k, n_v)[:, :, heads]
        beta, g, v, out = beta[:, :, heads], g[:, :, heads], v[:, :, heads], out[:, :, heads]
        if self.mode == "heuristic":
            return heuristic_effective_attention(q, k, beta, g)[0].cpu().numpy(), None
        M = gdn_effective_attention(q, k, beta, g, method=self.method, precision=self.precision)
        residual = float(relative_residual(M, v, out)[0])
        return M[0].float().cpu().numpy(), residual
