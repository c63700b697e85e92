"""What a run will write, computed before any model runs: arrays, shapes, dtypes, chunks, bytes.

Token layout: prompt p owns rows ``prompt_start[p] : prompt_start[p] + prompt_length[p]`` of every
per-token array, in file order. Chunk lengths along the token axis are powers of two, so the
longest chunk of a store is a multiple of every other: aligning work to it aligns it to all.
The arrays and their dimension names are the store contract (DESIGN.md section 4).

State layout: the snapshots of S_t (``--state-every``) are rows of a second axis, ``state``, laid
out the same way: prompt p owns rows ``state_start[p] : state_start[p] + state_count[p]`` of every
state array, in position order, and each region's first state row is aligned to the state chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..catalogue import (ATTENTION_MATRIX, CONTRIBUTION_LOGIT, CONTRIBUTION_NORM, CONTRIBUTION_VECTORS,
                         PER_TOKEN, ROW_DOCUMENT, STATE, ContributionSpec, HookSpec, MatrixSpec,
                         contribution_name)
from ..dtypes import (INDEX_DTYPE, MATRIX_DTYPE, RESIDUAL_DTYPE, STATE_DTYPE, STATE_DTYPES,
                      STORAGE_DTYPES, TOKEN_DTYPE, check, hook_dtype, itemsize)
from ..errors import GdnDumpError
from .states import DEFAULT_STATE_EVERY, StateLayout, state_counts, state_stride

TARGET_CHUNK_BYTES = 4 << 20
MAX_CHUNK_TOKENS = 1 << 20
PROMPT_CHUNK = 1024  # per-prompt arrays (attention residuals)
ATTENTION_TILE = 256
INDEX_CHUNK = 1 << 16  # prompt_start, prompt_length, prompt_id
# the [1, 1, t, t, d_model] chunks of contribution vectors: about this many bytes
VECTOR_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store, as it will be created."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    dims: tuple[str, ...]
    hook: HookSpec | None = None
    attrs: dict = field(default_factory=dict, hash=False, compare=False)
    stream: str | None = "token"  # rows arrive in order along "token", "prompt" or "state"; None: regions
    shards: tuple[int, ...] | None = None  # zarr sharding codec: chunks grouped into shard files

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize(self.dtype)

    @property
    def chunk_tokens(self) -> int:
        return self.chunks[0]

    @property
    def write_rows(self) -> int:
        """Rows written at once: a whole shard when sharded, else a whole chunk."""
        return (self.shards or self.chunks)[0]

    @property
    def per_token(self) -> bool:
        return self.stream == "token"


@dataclass
class Plan:
    """The layout of one run's store: the selection, every array, the rows of every prompt."""

    hooks: list[HookSpec]
    arrays: list[ArraySpec]
    prompt_lengths: np.ndarray  # [n_prompts] int64, after truncation
    prompt_starts: np.ndarray  # [n_prompts] int64
    n_rows: int
    storage_dtype: str
    max_length: int | None
    truncated: int
    matrices: list[MatrixSpec] = field(default_factory=list)
    attn_mode: str = "exact"
    regions: list[tuple[int, int]] = field(default_factory=list)  # prompts [lo, hi) per process
    skipped: int = 0  # prompts over max_length stored without tokens (--on-long skip)
    states: StateLayout | None = None  # the snapshot rows, when a state hook is selected
    contributions: list[ContributionSpec] = field(default_factory=list)

    def region_rows(self, region: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` owned by ``region`` (its first row is chunk aligned)."""
        lo, hi = self.regions[region]
        if lo == hi:
            return (0, 0)
        return int(self.prompt_starts[lo]), int(self.prompt_starts[hi - 1] + self.prompt_lengths[hi - 1])

    def region_states(self, region: int) -> tuple[int, int]:
        """State rows ``[lo, hi)`` owned by ``region`` (``(0, 0)`` without states)."""
        lo, hi = self.regions[region]
        if self.states is None or lo == hi:
            return (0, 0)
        return self.states.rows(lo, hi)

    def start_rows(self, prompt: int) -> dict[str, int]:
        """The first row of ``prompt`` along each row axis (``token``, ``state``, ``prompt``):
        where writing starts when a run starts (or resumes) at ``prompt``."""
        token = int(self.prompt_starts[prompt]) if prompt < self.n_prompts else self.n_rows
        starts = {"token": token, "prompt": prompt}
        if self.states is not None:
            starts["state"] = self.states.start_row(prompt)
        return starts

    @property
    def prompt_chunk(self) -> int | None:
        """Chunk of the per-prompt arrays written during the run (processes split only there)."""
        return prompt_chunk(self.matrices, self.attn_mode, self.n_prompts, self.contributions)

    @property
    def layer_products(self) -> list:
        """Every per-layer matrix product (:class:`MatrixSpec` s, :class:`ContributionSpec` s)."""
        return [*self.matrices, *self.contributions]

    @property
    def forward_layers(self) -> list[int]:
        """Layers the forward must reach for the products (besides the hooks' own)."""
        return [a.layer for a in self.matrices] + [x for c in self.contributions for x in c.forward_layers]

    @property
    def matrix_bytes(self) -> int:
        """Bytes the attention and contribution matrices cost (tiles past each prompt's length
        are never written)."""
        squares = int(np.square(self.prompt_lengths).sum())
        heads = sum(len(a.heads) for a in self.matrices)
        heads += sum(h.shape[0] for h in self.hooks if h.kind == ATTENTION_MATRIX)
        heads += sum(len(c.heads) * contribution_floats(c) for c in self.contributions)
        return heads * squares * itemsize(MATRIX_DTYPE)

    @property
    def n_prompts(self) -> int:
        return len(self.prompt_lengths)

    @property
    def total_bytes(self) -> int:
        """Bytes written: the per-token arrays in full, the attention matrices as written."""
        return sum(a.nbytes for a in self.arrays if a.stream is not None) + self.matrix_bytes

    @property
    def bytes_per_token(self) -> int:
        states = self.states
        return bytes_per_token(self.hooks, self.storage_dtype, states.stride if states else None,
                               states.dtype if states else STATE_DTYPE)


def bytes_per_token(hooks: list[HookSpec], storage_dtype: str, state_stride: int | None = None,
                    state_dtype: str = STATE_DTYPE) -> int:
    """Bytes of one token row over ``tokens`` and every per-token hook, plus a stride's share of
    each state snapshot (what sorting windows and the reorder buffer are measured in)."""
    per_token = sum(_row_bytes(h, storage_dtype) for h in hooks if h.kind == PER_TOKEN)
    states = sum(_row_bytes(h, state_dtype) for h in hooks if h.kind == STATE)
    return itemsize(TOKEN_DTYPE) + per_token + (states // state_stride if state_stride else 0)


def prompt_chunk(matrices: list[MatrixSpec], attn_mode: str, n_prompts: int,
                 contributions: list[ContributionSpec] | tuple = ()) -> int | None:
    """Chunk of the per-prompt arrays written during a run (the residuals of exact GDN
    matrices and of contributions), or None when there are none: processes may split only at
    its multiples."""
    if contributions or any(a.has_residual(attn_mode) for a in matrices):
        return max(1, min(n_prompts, PROMPT_CHUNK))
    return None


def make_plan(
    hooks: list[HookSpec],
    prompt_lengths: np.ndarray,
    *,
    storage_dtype: str = "float16",
    chunk_tokens: int | None = None,
    max_length: int | None = None,
    truncated: int = 0,
    skipped: int = 0,
    target_chunk_bytes: int = TARGET_CHUNK_BYTES,
    matrices: list[MatrixSpec] | tuple = (),
    attn_mode: str = "exact",
    shard_tokens: int | None = None,
    regions: list[tuple[int, int]] | None = None,
    state_every: int | str = DEFAULT_STATE_EVERY,
    state_dtype: str = STATE_DTYPE,
    row_documents: bool = False,
    contributions: list[ContributionSpec] | tuple = (),
) -> Plan:
    check("--dtype", storage_dtype, STORAGE_DTYPES)
    for option, value in (("--chunk-tokens", chunk_tokens), ("--shard-tokens", shard_tokens)):
        if value is not None and value < 1:
            raise GdnDumpError(f"{option} must be at least 1, not {value}")
    lengths = np.asarray(prompt_lengths, dtype=np.int64)
    rows = _RowLayout(int(lengths.sum()), chunk_tokens, shard_tokens, target_chunk_bytes)
    per_token = [h for h in hooks if h.kind == PER_TOKEN]
    write_units = [rows.write_rows(itemsize(TOKEN_DTYPE))]
    if row_documents:
        write_units.append(rows.write_rows(itemsize(INDEX_DTYPE)))
    write_units += [rows.write_rows(_row_bytes(h, storage_dtype)) for h in per_token]
    regions = list(regions) if regions else [(0, len(lengths))]
    starts, n_rows = _region_layout(lengths, regions, math.lcm(*write_units))
    arrays = [ArraySpec("tokens", (n_rows,), TOKEN_DTYPE, dims=("token",),
                        **rows.layout(itemsize(TOKEN_DTYPE), ()))]
    if row_documents:  # packed contexts: each row's source document
        arrays.append(ArraySpec(ROW_DOCUMENT, (n_rows,), INDEX_DTYPE, dims=("token",),
                                **rows.layout(itemsize(INDEX_DTYPE), ())))
    arrays += _hook_arrays(hooks, n_rows, len(lengths), lengths, storage_dtype, rows)
    arrays += _matrix_arrays(list(matrices), attn_mode, lengths)
    arrays += _contribution_arrays(list(contributions), lengths)
    state_hooks = [h for h in hooks if h.kind == STATE]
    states = None
    if state_hooks:
        states = _state_layout(state_hooks, lengths, regions, state_stride(state_every), state_dtype,
                               target_chunk_bytes)
        arrays += states.arrays
    return Plan(hooks, arrays, lengths, starts, n_rows, storage_dtype, max_length, truncated,
                list(matrices), attn_mode, regions, skipped, states, list(contributions))


class _RowLayout:
    """Chunks (and shards) along the token axis: a few MB per chunk, power-of-two rows."""

    def __init__(self, n_tokens: int, chunk_tokens: int | None, shard_tokens: int | None,
                 target_chunk_bytes: int):
        self.n_tokens, self.chunk_tokens, self.shard_tokens = n_tokens, chunk_tokens, shard_tokens
        self.target_chunk_bytes = target_chunk_bytes

    def chunk(self, row_bytes: int) -> int:
        if self.chunk_tokens is not None:
            return self.chunk_tokens
        fit = _pow2_floor(max(1, self.target_chunk_bytes // max(row_bytes, 1)))
        return max(1, min(fit, MAX_CHUNK_TOKENS, _pow2_ceil(max(self.n_tokens, 1))))

    def layout(self, row_bytes: int, row_shape: tuple[int, ...]) -> dict:
        """``chunks`` (and ``shards``: a multiple of the chunk holding about ``shard_tokens`` rows)."""
        chunk = self.chunk(row_bytes)
        if self.shard_tokens is None:
            return {"chunks": (chunk, *row_shape)}
        chunk = min(chunk, self.shard_tokens)
        shard = -(-self.shard_tokens // chunk) * chunk
        return {"chunks": (chunk, *row_shape), "shards": (shard, *row_shape)}

    def write_rows(self, row_bytes: int) -> int:
        layout = self.layout(row_bytes, ())
        return (layout.get("shards") or layout["chunks"])[0]


def _row_bytes(hook: HookSpec, storage_dtype: str) -> int:
    """Bytes of one row of ``hook`` (a state hook's rows are in ``storage_dtype`` itself)."""
    dtype = storage_dtype if hook.kind == STATE else hook_dtype(hook.scalar, storage_dtype)
    return int(np.prod(hook.shape, dtype=np.int64)) * itemsize(dtype)


def _hook_arrays(hooks, n_rows, n_prompts, lengths, storage_dtype, rows: _RowLayout) -> list[ArraySpec]:
    l_max = int(lengths.max()) if len(lengths) else 0
    arrays = []
    for hook in hooks:
        if hook.kind == STATE:
            continue  # rows of the state axis: see _state_layout
        if hook.kind == ATTENTION_MATRIX:
            kind = "softmax" if hook.name.endswith("hook_pattern") else "softmax_scores"
            arrays.append(_matrix_spec(hook.name, n_prompts, hook.shape[0], hook.dims[0], l_max,
                                       {"kind": kind}, hook))
            continue
        arrays.append(ArraySpec(hook.name, (n_rows, *hook.shape), hook_dtype(hook.scalar, storage_dtype),
                                dims=("token", *hook.dims), hook=hook,
                                **rows.layout(_row_bytes(hook, storage_dtype), hook.shape)))
    return arrays


def _matrix_arrays(matrices: list[MatrixSpec], attn_mode: str, lengths: np.ndarray) -> list[ArraySpec]:
    n_prompts = len(lengths)
    l_max = int(lengths.max()) if n_prompts else 0
    arrays = []
    for a in matrices:
        attrs = {"kind": a.kind(attn_mode), "layer": a.layer, "layer_type": a.layer_type,
                 "heads": list(a.heads)}
        arrays.append(_matrix_spec(a.name, n_prompts, len(a.heads), a.head_dim, l_max, attrs))
        if a.has_residual(attn_mode):
            arrays.append(ArraySpec(a.residual_name, (n_prompts,), RESIDUAL_DTYPE,
                                    (prompt_chunk(matrices, attn_mode, n_prompts),), ("prompt",),
                                    attrs={"meaning": "||M V - recurrence_out|| / ||recurrence_out||"},
                                    stream="prompt"))
    return arrays


def contribution_floats(spec: ContributionSpec) -> int:
    """float32 values stored per (head, query, key) of a contribution layer."""
    return 1 + (spec.logits is not None) + (spec.d_model if spec.vectors else 0)


def _contribution_arrays(contributions: list[ContributionSpec], lengths: np.ndarray) -> list[ArraySpec]:
    n_prompts = len(lengths)
    l_max = int(lengths.max()) if n_prompts else 0
    arrays = []
    for c in contributions:
        attrs = {"layer": c.layer, "layer_type": c.layer_type, "heads": list(c.heads)}
        head_dim = c.matrix.head_dim
        arrays.append(_matrix_spec(contribution_name(c.layer, CONTRIBUTION_NORM), n_prompts,
                                   len(c.heads), head_dim, l_max, {**attrs, "kind": CONTRIBUTION_NORM}))
        if c.logits is not None:
            arrays.append(_matrix_spec(contribution_name(c.layer, CONTRIBUTION_LOGIT), n_prompts,
                                       len(c.heads), head_dim, l_max,
                                       {**attrs, "kind": CONTRIBUTION_LOGIT, "target": c.logits}))
        if c.vectors:
            tile = vector_tile(c.d_model, l_max)
            arrays.append(ArraySpec(contribution_name(c.layer, CONTRIBUTION_VECTORS),
                                    (n_prompts, len(c.heads), l_max, l_max, c.d_model), MATRIX_DTYPE,
                                    (1, 1, tile, tile, c.d_model),
                                    ("prompt", head_dim, "query", "key", "d_model"),
                                    attrs={**attrs, "kind": CONTRIBUTION_VECTORS}, stream=None))
        arrays.append(ArraySpec(c.residual_name, (n_prompts,), RESIDUAL_DTYPE,
                                (prompt_chunk([], "exact", n_prompts, contributions),), ("prompt",),
                                attrs={"meaning": "max_i ||sum_{h,j} c_{h,i,j} - out_i|| / ||out_i||"},
                                stream="prompt"))
    return arrays


def vector_tile(d_model: int, l_max: int) -> int:
    """Query and key rows of a ``[1, 1, t, t, d_model]`` chunk of contribution vectors: a power of
    two (it divides the matrices' tile, so blocks of rows align to both), about
    :data:`VECTOR_CHUNK_BYTES`."""
    fit = _pow2_floor(max(1, int(math.isqrt(VECTOR_CHUNK_BYTES // (itemsize(MATRIX_DTYPE) * d_model)))))
    return max(1, min(fit, ATTENTION_TILE, _pow2_ceil(max(l_max, 1))))


def _region_layout(lengths: np.ndarray, regions: list[tuple[int, int]], align: int
                   ) -> tuple[np.ndarray, int]:
    """Rows of each prompt: prompts back to back, each region starting on a multiple of ``align``
    (the longest chunk or shard), so no two regions share a chunk. Returns starts and row count."""
    starts = np.zeros_like(lengths)
    row = 0
    for r, (lo, hi) in enumerate(regions):
        if r and hi > lo:
            row = -(-row // align) * align
        if hi > lo:
            starts[lo:hi] = row + np.concatenate([[0], np.cumsum(lengths[lo:hi - 1])])
            row += int(lengths[lo:hi].sum())
    return starts, row


def _matrix_spec(name: str, n_prompts: int, n_heads: int, head_dim: str, l_max: int, attrs: dict,
                 hook: HookSpec | None = None) -> ArraySpec:
    """``[n_prompts, heads, L_max, L_max]`` float32 in square tiles, one prompt and head per chunk."""
    tile = min(ATTENTION_TILE, max(l_max, 1))
    return ArraySpec(name, (n_prompts, n_heads, l_max, l_max), MATRIX_DTYPE, (1, 1, tile, tile),
                     ("prompt", head_dim, "query", "key"), hook, attrs, stream=None)


# ---- states: snapshots of S_t along the "state" axis (see gdn_dump.store.states) ---------------

def _state_layout(hooks: list[HookSpec], lengths: np.ndarray, regions, stride: int | None,
                  dtype: str, target_chunk_bytes: int) -> StateLayout:
    check("--state-dtype", dtype, STATE_DTYPES)
    counts = state_counts(lengths, stride)
    rows = _RowLayout(int(counts.sum()), None, None, target_chunk_bytes)
    align = math.lcm(*(rows.write_rows(_row_bytes(h, dtype)) for h in hooks))
    starts, n_states = _region_layout(counts, regions, align)
    arrays = [ArraySpec(h.name, (n_states, *h.shape), dtype, dims=(STATE, *h.dims), hook=h,
                        stream=STATE, **rows.layout(_row_bytes(h, dtype), h.shape)) for h in hooks]
    return StateLayout(stride, dtype, starts, counts, n_states, arrays)


def index_chunks(n_prompts: int) -> int:
    """Chunk of the prompt index arrays (``prompt_start``, ``prompt_length``, ``prompt_id``)."""
    return max(1, min(n_prompts, INDEX_CHUNK))


INDEX_ARRAYS = {"prompt_start": INDEX_DTYPE, "prompt_length": INDEX_DTYPE}


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _pow2_floor(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()
