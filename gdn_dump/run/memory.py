"""How much memory a plan needs for one prompt of L tokens: what ``--dry-run`` reports.

An estimate from the model's config and the plan, no weights loaded, in four parts:

- ``weights``: the parameters in the model dtype;
- ``forward``: the widest layer's live activations, linear in L (softmax attention adds its
  ``[heads, L, L]`` scores and pattern when TransformerLens's explicit path runs, see
  :func:`gdn_dump.run.capture.softmax_path`);
- ``matrices``: what the exact attention matrices keep during the forward (the hooks they are
  computed from) and need after it (per head a ``d_k x L`` state and a block of rows); for
  contributions also their quadratic forms' operands (:func:`_contribution_bytes`);
- ``rows``: the prompt's rows on the host while they wait for the writer, all of them below the
  streaming length, a few :data:`~gdn_dump.run.capture.PIECE_BYTES` pieces above it;
- and a fixed :data:`RUN_OVERHEAD` on the host (threads, TensorStore, the store's metadata).

The per-token constants of the GDN kernels count the float32 tensors transformers' torch
reference keeps live at once (expanded q/k, v, their beta-scaled and chunked copies, the chunk's
``[C, C]`` products); tests hold the estimate within 2x of peak RSS measured on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..catalogue import GDN, GDN_LAYER_TYPE
from ..dtypes import itemsize
from ..store.layout import Plan
from ..model.attention import BRIDGE
from .attn_capture import block_rows
from .capture import PIECE_BYTES, stop_layer
from .contrib_capture import VECTOR_PIECE_BYTES

GDN_CHUNK = 64  # tokens per chunk of both GDN kernels
_F32 = 4
_QUEUE = 3  # sink queue (2) and the piece in hand
_WRITER_PENDING = 8  # chunks queued to the writer thread (RowWriter's max_pending)
RUN_OVERHEAD = 64 << 20  # what a run costs beside the model whatever the prompt (measured 35-100 MiB)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one prompt of ``tokens`` tokens needs (see the module's docstring)."""

    tokens: int
    weights: int
    forward: int
    matrices: int
    rows: int
    streams: bool  # its rows go to the writer as they are captured
    device: str  # "cpu": every part is host memory; "cuda": rows on the host, the rest on the GPU

    @property
    def device_bytes(self) -> int:
        return self.weights + self.forward + self.matrices

    @property
    def host_bytes(self) -> int:
        return RUN_OVERHEAD + self.rows + (self.device_bytes if self.device == "cpu" else 0)


def estimate_memory(config, plan: Plan, tokens: int, *, model_dtype: str, device: str,
                    fla: bool, softmax: str, stream_from: int) -> MemoryEstimate:
    """The estimate for a prompt of ``tokens`` tokens run with ``plan`` (``softmax``:
    :func:`gdn_dump.run.capture.softmax_path`; ``stream_from``: :func:`.plan.stream_tokens`)."""
    b = itemsize(model_dtype)
    stop = stop_layer(plan.hooks, plan.forward_layers)  # the layers the forward runs
    layers = config.layer_types[:stop]
    per_token = max([_gdn_bytes(config, b, fla) if t == GDN_LAYER_TYPE else
                     _attention_bytes(config, b, tokens if softmax == BRIDGE else 0)
                     for t in layers] + [_mlp_bytes(config, b)])
    streams = tokens >= stream_from
    rows = _streamed_rows(plan, tokens) if streams else tokens * plan.bytes_per_token
    return MemoryEstimate(tokens, parameter_count(config) * b,
                          tokens * (per_token + 4 * config.hidden_size * b),
                          _matrix_bytes(config, plan, tokens, b), rows, streams, device)


def _streamed_rows(plan: Plan, tokens: int) -> int:
    """Host bytes of a streamed prompt's rows: the pieces in the sink's queue, the chunks queued
    to the writer and each array's chunk buffer (whole chunks are written, never rewritten)."""
    row_bytes = [a.nbytes // max(a.shape[0], 1) for a in plan.arrays if a.stream]
    writes = [a.write_rows * r for a, r in zip((a for a in plan.arrays if a.stream), row_bytes)]
    piece = min(PIECE_BYTES, tokens * max(row_bytes, default=0))
    return _QUEUE * piece + _WRITER_PENDING * max(writes, default=0) + sum(writes)


def parameter_count(config) -> int:
    """Parameters of the text model (embedding, layers, head) from its config."""
    h, vocab = config.hidden_size, config.vocab_size
    total = vocab * h * (1 if getattr(config, "tie_word_embeddings", False) else 2) + h
    for layer_type in config.layer_types:
        if layer_type == GDN_LAYER_TYPE:  # projections, conv, out, A_log and dt_bias, gated norm
            k, v, nv = _gdn_widths(config)
            conv = (2 * k + v) * config.linear_conv_kernel_dim
            total += h * (2 * k + 2 * v + 2 * nv) + conv + v * h + 2 * nv + config.linear_value_head_dim
        else:  # q (with its gate), k, v, o, q and k norms
            q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
            total += h * (2 * q + 2 * kv) + q * h + 2 * config.head_dim
        total += _mlp_parameters(config) + 2 * h
    return total


def _gdn_widths(config) -> tuple[int, int, int]:
    """Key width (all key heads), value width, value heads of a GDN layer."""
    nk, nv = config.linear_num_key_heads, config.linear_num_value_heads
    return nk * config.linear_key_head_dim, nv * config.linear_value_head_dim, nv


def _gdn_bytes(config, b: int, fla: bool) -> int:
    """Live bytes per token inside a GDN layer: projections, causal conv, kernel, gated norm."""
    k, v, nv = _gdn_widths(config)
    dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
    outside = b * (2 * k + 2 * v + 2 * nv) + 2 * b * (2 * k + v) + 3 * b * v
    if fla:  # inputs in the model dtype, the chunk's [C, C] product and per-chunk states
        kernel = b * nv * (2 * dk + 2 * dv) + _F32 * nv * (GDN_CHUNK + dk * dv // GDN_CHUNK)
    else:
        kernel = _F32 * nv * (10 * dk + 8 * dv + 4 * GDN_CHUNK)
    return outside + kernel


def _attention_bytes(config, b: int, scores_of: int) -> int:
    """Live bytes per token of a softmax-attention layer; ``scores_of``: the key length whose
    float32 scores, softmax and pattern the explicit path keeps (0: SDPA, linear)."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return b * (4 * q + 2 * kv) + 3 * _F32 * config.num_attention_heads * scores_of


def _mlp_bytes(config, b: int) -> int:
    experts = getattr(config, "num_experts", 0) or 0
    if experts:
        width = (config.moe_intermediate_size * config.num_experts_per_tok
                 + getattr(config, "shared_expert_intermediate_size", 0))
    else:
        width = config.intermediate_size
    return 3 * b * width


def _mlp_parameters(config) -> int:
    h = config.hidden_size
    experts = getattr(config, "num_experts", 0) or 0
    if not experts:
        return 3 * h * config.intermediate_size
    shared = getattr(config, "shared_expert_intermediate_size", 0)  # with its own 1-wide gate
    return 3 * h * (experts * config.moe_intermediate_size + shared) + h * experts + (h if shared else 0)


def _matrix_bytes(config, plan: Plan, tokens: int, b: int) -> int:
    """The hooks every selected GDN matrix keeps through the forward, then, per layer, the
    ``d_k x L`` state of each head and a float64-checked block of rows of each head."""
    total = 0
    rows = min(block_rows(plan), max(tokens, 1))
    for a in plan.matrices:
        heads = len(a.heads)
        if a.layer_type == GDN:
            k, v, nv = _gdn_widths(config)
            total += tokens * b * (2 * k + 2 * v + 2 * nv)
            after = heads * tokens * (_F32 * config.linear_key_head_dim + 3 * 8 * rows)
        else:  # the pattern itself (the explicit path), cut into blocks
            after = heads * tokens * tokens * _F32
        total += after
    return total + sum(_contribution_bytes(config, c, tokens, b, rows) for c in plan.contributions)


def _contribution_bytes(config, c, tokens: int, b: int, rows: int) -> int:
    """What one layer's contributions keep: its hooks through the forward (and the final norm's
    input for the logits), the matrix as for ``attn-matrix``, and after the forward, one head at a
    time, the norms' ``[L, P]`` value products, a block's ``[rows, P]`` gate products and
    ``[rows, L]`` result (``P = Dv (Dv + 1) / 2``), the targets' unembedding rows and a piece of
    vectors (:data:`~.contrib_capture.VECTOR_PIECE_BYTES`)."""
    d_model = config.hidden_size
    if c.layer_type == GDN:
        k, v, nv = _gdn_widths(config)
        dv = config.linear_value_head_dim
        kept = tokens * b * (2 * k + 4 * v + 2 * nv + d_model)
        matrix = len(c.heads) * tokens * (_F32 * config.linear_key_head_dim + 3 * 8 * rows)
    else:
        dv = config.head_dim
        kept = tokens * b * (2 * config.num_attention_heads * dv + d_model)
        matrix = (config.num_attention_heads + len(c.heads)) * tokens * tokens * _F32
    quadratic = _F32 * ((tokens + rows) * dv * (dv + 1) // 2 + rows * tokens)
    logits = tokens * d_model * (b + _F32) if c.logits is not None else 0
    return kept + matrix + quadratic + logits + (VECTOR_PIECE_BYTES if c.vectors else 0)


def report_lengths(longest: int, max_positions: int | None) -> list[int]:
    """Prompt lengths the dry run reports: the plan's longest prompt and 4k, 32k, 128k tokens up
    to the model's context."""
    limit = max_positions or 1 << 62
    return sorted({longest, *(n for n in (4096, 32768, 131072) if n <= limit)} - {0})
