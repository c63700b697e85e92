"""What a run stores per layer beyond the hooks: attention matrices (:class:`MatrixSpec`) and
per-source-token contributions (:class:`ContributionSpec`), with their modes and targets."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SelectionError
from .names import (CONTRIBUTION_NORM, CONTRIBUTION_RESIDUAL, GDN, LOGITS_NEXT, LOGITS_NONE,
                    contribution_name, matrix_name, residual_name)

# How a matrix is made: the exact decomposition or TransformerLens's heuristic formula, and for the
# exact GDN matrix which algorithm (both exact; the chunked one is the default: measured faster than
# the closed form at every length on the CPU, benchmarks/bench_attn_cpu.txt).
MATRIX_MODES = ("exact", "heuristic")
MATRIX_METHODS = ("chunked", "closed_form")
# The matrix kinds of the store contract (attribute ``kind`` of ``attn_matrix``), by layer type and mode.
MATRIX_KINDS = {("gdn", "exact"): "gdn_exact", ("gdn", "heuristic"): "gdn_heuristic"}
SOFTMAX_KIND = "softmax"


@dataclass(frozen=True)
class MatrixSpec:
    """One layer whose attention matrix is stored (``attn-matrix``, ``extract --attn-layers``)."""

    layer: int
    layer_type: str  # "gdn" | "attention"
    heads: tuple[int, ...]
    n_heads: int  # all heads of the layer

    @property
    def name(self) -> str:
        return matrix_name(self.layer)

    @property
    def residual_name(self) -> str:
        return residual_name(self.layer)

    @property
    def head_dim(self) -> str:
        full = "v_head" if self.layer_type == GDN else "attn_head"
        return full if len(self.heads) == self.n_heads else f"selected_{full}"

    def kind(self, mode: str) -> str:
        return MATRIX_KINDS[("gdn", mode)] if self.layer_type == GDN else SOFTMAX_KIND

    def has_residual(self, mode: str) -> bool:
        """Exact GDN matrices are checked against the layer's output on every prompt."""
        return self.layer_type == GDN and mode == "exact"


@dataclass(frozen=True)
class ContributionSpec:
    """One layer whose per-source-token contributions are stored (``gdn-dump contributions``).

    ``logits``: the target of the logit attribution (:data:`LOGITS_NEXT` or a token id), or None;
    ``vectors``: also store every ``c_{h,i,j}`` (``d_model`` floats each)."""

    matrix: MatrixSpec  # the layer and heads
    d_model: int
    final_layer: int  # the model's last layer: its hook_resid_post is the final norm's input
    logits: str | int | None = LOGITS_NEXT
    vectors: bool = False

    @property
    def layer(self) -> int:
        return self.matrix.layer

    @property
    def layer_type(self) -> str:
        return self.matrix.layer_type

    @property
    def heads(self) -> tuple[int, ...]:
        return self.matrix.heads

    @property
    def name(self) -> str:
        """The array every contribution run stores (the norms); keys the layer's product."""
        return contribution_name(self.layer, CONTRIBUTION_NORM)

    @property
    def residual_name(self) -> str:
        return contribution_name(self.layer, CONTRIBUTION_RESIDUAL)

    @property
    def forward_layers(self) -> list[int]:
        """The layers a forward must run through: this one, and the last for the logits."""
        return [self.layer] + ([self.final_layer] if self.logits is not None else [])


def logit_target(text: str, vocab_size: int | None = None) -> str | int | None:
    """``--logits``: :data:`LOGITS_NEXT`, :data:`LOGITS_NONE` (None) or a token id below
    ``vocab_size``."""
    text = str(text).strip()
    if text in (LOGITS_NEXT, LOGITS_NONE):
        return None if text == LOGITS_NONE else text
    if not text.isdigit():
        raise SelectionError(f"--logits: expected {LOGITS_NEXT}, {LOGITS_NONE} or a token id, "
                             f"not {text!r}")
    if vocab_size is not None and int(text) >= vocab_size:
        raise SelectionError(f"--logits: token id {text} is out of range; the vocabulary has "
                             f"ids 0-{vocab_size - 1}")
    return int(text)
