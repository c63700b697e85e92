"""What a run will write, computed before any model runs: arrays, shapes, dtypes, chunks, bytes.

Token layout: prompt p owns rows ``prompt_start[p] : prompt_start[p] + prompt_length[p]`` of every
per-token array, in file order. Chunk lengths along the token axis are powers of two, so the
longest chunk of a store is a multiple of every other: aligning work to it aligns it to all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..catalogue import ATTENTION_MATRIX, HookSpec
from ..errors import GdnDumpError

STORAGE_DTYPES = ("float32", "float16", "bfloat16")
SCALAR_DTYPE = "float32"
TARGET_CHUNK_BYTES = 4 << 20
MAX_CHUNK_TOKENS = 1 << 20
PROMPT_CHUNK = 1024  # per-prompt arrays (attention residuals)
ATTENTION_TILE = 256
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8}


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
    stream: str | None = "token"  # rows arrive in order along "token" or "prompt"; None: regions
    shards: tuple[int, ...] | None = None  # zarr sharding codec: chunks grouped into shard files

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _ITEMSIZE.get(self.dtype, 8)

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
    """The layout of one run's store."""

    hooks: list[HookSpec]
    arrays: list[ArraySpec]
    prompt_lengths: np.ndarray  # [n_prompts] int64, after truncation
    prompt_starts: np.ndarray  # [n_prompts] int64
    n_rows: int
    storage_dtype: str
    max_length: int | None
    truncated: int
    attn_layers: list = field(default_factory=list)  # AttnLayer, see attn_capture
    attn_mode: str = "exact"
    regions: list[tuple[int, int]] = field(default_factory=list)  # prompts [lo, hi) per process
    skipped: int = 0  # prompts over max_length stored without tokens (--on-long skip)

    def region_rows(self, region: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` owned by ``region`` (its first row is chunk aligned)."""
        lo, hi = self.regions[region]
        if lo == hi:
            return (0, 0)
        return int(self.prompt_starts[lo]), int(self.prompt_starts[hi - 1] + self.prompt_lengths[hi - 1])

    @property
    def prompt_chunk(self) -> int | None:
        """Chunk of the per-prompt arrays written during the run (processes split only there)."""
        return next((a.chunks[0] for a in self.arrays if a.stream == "prompt"), None)

    @property
    def matrix_bytes(self) -> int:
        """Bytes the attention matrices cost (tiles past each prompt's length are never written)."""
        squares = int(np.square(self.prompt_lengths).sum())
        heads = sum(len(a.heads) for a in self.attn_layers)
        heads += sum(a.hook.shape[0] for a in self.arrays if a.hook and a.hook.kind == ATTENTION_MATRIX)
        return heads * squares * 4

    @property
    def n_prompts(self) -> int:
        return len(self.prompt_lengths)

    @property
    def total_bytes(self) -> int:
        """Bytes written: the per-token arrays in full, the attention matrices as written."""
        return sum(a.nbytes for a in self.arrays if a.stream is not None) + self.matrix_bytes

    @property
    def bytes_per_token(self) -> int:
        return sum(a.nbytes // max(a.shape[0], 1) for a in self.arrays if a.per_token)

    def array(self, name: str) -> ArraySpec:
        return next(a for a in self.arrays if a.name == name)


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
    attn_layers: list | tuple = (),
    attn_mode: str = "exact",
    shard_tokens: int | None = None,
    regions: list[tuple[int, int]] | None = None,
) -> Plan:
    if storage_dtype not in STORAGE_DTYPES:
        raise GdnDumpError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, not {storage_dtype!r}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise GdnDumpError(f"--chunk-tokens must be at least 1, not {chunk_tokens}")
    if shard_tokens is not None and shard_tokens < 1:
        raise GdnDumpError(f"--shard-tokens must be at least 1, not {shard_tokens}")
    lengths = np.asarray(prompt_lengths, dtype=np.int64)
    n_tokens = int(lengths.sum())
    l_max = int(lengths.max()) if len(lengths) else 0

    def token_chunks(row_bytes: int) -> int:
        if chunk_tokens is not None:
            return chunk_tokens
        fit = _pow2_floor(max(1, target_chunk_bytes // max(row_bytes, 1)))
        return max(1, min(fit, MAX_CHUNK_TOKENS, _pow2_ceil(max(n_tokens, 1))))

    def rows_layout(row_bytes: int, row_shape: tuple[int, ...]) -> dict:
        """``chunks`` (and ``shards``: a multiple of the chunk holding about ``shard_tokens`` rows)."""
        chunk = token_chunks(row_bytes)
        if shard_tokens is None:
            return {"chunks": (chunk, *row_shape)}
        chunk = min(chunk, shard_tokens)
        shard = -(-shard_tokens // chunk) * chunk
        return {"chunks": (chunk, *row_shape), "shards": (shard, *row_shape)}

    def row_bytes_of(hook: HookSpec) -> int:
        dtype = SCALAR_DTYPE if hook.scalar else storage_dtype
        return int(np.prod(hook.shape, dtype=np.int64)) * _ITEMSIZE[dtype]

    per_token = [h for h in hooks if h.kind != ATTENTION_MATRIX]
    write_units = [(rows_layout(4, ()).get("shards") or rows_layout(4, ())["chunks"])[0]]
    write_units += [(lambda lay: (lay.get("shards") or lay["chunks"])[0])(rows_layout(row_bytes_of(h), h.shape))
                    for h in per_token]
    regions = list(regions) if regions else [(0, len(lengths))]
    starts, n_rows = _region_layout(lengths, regions, math.lcm(*write_units))

    arrays = [ArraySpec("tokens", (n_rows,), "int32", dims=("token",), **rows_layout(4, ()))]
    n_prompts = len(lengths)
    for hook in hooks:
        if hook.kind == ATTENTION_MATRIX:
            kind = "softmax" if hook.name.endswith("hook_pattern") else "softmax_scores"
            arrays.append(_matrix_spec(hook.name, n_prompts, hook.shape[0], hook.dims[0], l_max,
                                       {"kind": kind}, hook))
            continue
        dtype = SCALAR_DTYPE if hook.scalar else storage_dtype
        arrays.append(ArraySpec(hook.name, (n_rows, *hook.shape), dtype, dims=("token", *hook.dims),
                                hook=hook, **rows_layout(row_bytes_of(hook), hook.shape)))
    for a in attn_layers:
        attrs = {"kind": a.kind(attn_mode), "layer": a.layer, "layer_type": a.layer_type,
                 "heads": list(a.heads)}
        arrays.append(_matrix_spec(a.name, n_prompts, len(a.heads), a.head_dim, l_max, attrs))
        if a.layer_type == "gdn" and attn_mode == "exact":
            arrays.append(ArraySpec(f"blocks.{a.layer}.attn_residual", (n_prompts,), "float64",
                                    (max(1, min(n_prompts, PROMPT_CHUNK)),), ("prompt",),
                                    attrs={"meaning": "||M V - recurrence_out|| / ||recurrence_out||"},
                                    stream="prompt"))
    return Plan(hooks, arrays, lengths, starts, n_rows, storage_dtype, max_length, truncated,
                list(attn_layers), attn_mode, regions, skipped)


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
    return ArraySpec(name, (n_prompts, n_heads, l_max, l_max), "float32", (1, 1, tile, tile),
                     ("prompt", head_dim, "query", "key"), hook, attrs, stream=None)


def check_free_space(out: str | Path, needed: int) -> None:
    """Refuse a run that cannot fit on the target disk (``--force`` skips this check)."""
    from .location import locate

    free = locate(out).free_bytes()
    if free is not None and needed > free:
        raise GdnDumpError(
            f"the store needs about {format_bytes(needed)} but {out} has {format_bytes(free)} "
            "free; free space, write elsewhere, or pass --force"
        )


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
