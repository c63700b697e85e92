"""Batched prefill through the bridge with hooks that keep only real (non-padding) token rows.

Batches are right-padded and run without an attention mask: the causal conv, the recurrence and
softmax attention are all causal, so the first ``L`` positions of a padded row equal the prompt run
alone, and padding never reaches the store. Each hook gathers the real rows in store order (prompt
by prompt, token by token) and casts them to the storage dtype on the model's device, halving the
bytes moved.

On CUDA the device-to-host copies go into pinned host memory on a side stream, without blocking:
the forward of the batch goes on while its hooks' rows are copied, and :meth:`CapturedBatch.wait`
(called by the writer side, not by the forward loop) is the only synchronisation.

A prompt too long to hold (see :func:`gdn_dump.run.schedule.streams`) runs with ``stream``: each
hook's rows leave as they are captured, in :class:`RowPiece` s of about :data:`PIECE_BYTES`, and
only the tokens, counts and matrices wait for the end of the forward. Host memory is then a few
pieces (the sink's queue holds the forward back), not the prompt's rows.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import torch

from ..catalogue import ATTENTION, ATTENTION_MATRIX, MODEL, STATE, HookSpec
from ..dtypes import STATE_DTYPE, STORAGE_DTYPES, hook_dtype, itemsize
from ..errors import GdnDumpError, RunFailure
from ..model.attention import BRIDGE, SDPA, memory_efficient_attention
from .attn_capture import PromptMatrix
from ..model.load import torch_dtype
from ..ops.stats_device import batch_stats

OVERFLOW, NONFINITE = "overflow", "nonfinite"
PIECE_BYTES = 16 << 20  # rows of one array per RowPiece of a streamed prompt


@dataclass
class CapturedBatch:
    """One batch's hook rows on the host, possibly still being copied (CUDA)."""

    prompts: list[int]  # store indices of the batch's prompts, in row order
    lengths: list[int]  # tokens of each prompt (all at least 1)
    tokens: np.ndarray  # [n_rows] int32, prompt after prompt
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [n_rows, *shape]; states: [n_states, ...]
    dtypes: dict[str, str] = field(default_factory=dict)
    # name -> one attn_capture.PromptMatrix per prompt (row blocks, computed as they are read)
    matrices: dict[str, list] = field(default_factory=dict)
    count_keys: list[tuple[str, str]] = field(default_factory=list)  # (OVERFLOW | NONFINITE, hook)
    count_values: torch.Tensor | None = None  # host, aligned with count_keys
    ready: torch.cuda.Event | None = None
    residuals: dict[str, list[float]] = field(default_factory=dict)  # name -> per prompt
    empty: list[int] = field(default_factory=list)  # prompts without tokens, riding along
    stat_values: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [H, K] moments (CUDA)
    # state array name -> (norm, effective rank) [n_states, H] of each snapshot, host (after wait)
    state_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    width: int = 0  # padded length of the batch that ran (its padding: width * len(lengths) - rows)
    streamed: set[str] = field(default_factory=set)  # arrays whose rows went ahead as RowPieces

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()

    def numpy_rows(self):
        """``(name, rows)`` in storage dtype, after :meth:`wait`."""
        for name, tensor in self.rows.items():
            yield name, to_storage_numpy(tensor, self.dtypes[name])

    def counts(self, kind: str) -> dict[str, int]:
        """Non-zero counts of ``kind`` per hook, after :meth:`wait`: ``OVERFLOW`` (finite values
        that became inf when cast to float16) or ``NONFINITE`` (NaN/inf the model produced)."""
        if self.count_values is None:
            return {}
        counts: dict[str, int] = {}
        for (k, name), n in zip(self.count_keys, self.count_values.tolist()):
            if k == kind and n:  # a streamed array is counted piece by piece
                counts[name] = counts.get(name, 0) + int(n)
        return counts


@dataclass
class RowPiece:
    """The next rows of one array of a streamed prompt, on the host (possibly still being copied):
    handed to the writer as they come, before the rest of the prompt's batch."""

    prompt: int  # the store index of the streamed prompt
    name: str
    rows: torch.Tensor  # [n, *shape] in the storage dtype
    dtype: str
    moments: torch.Tensor | None = None  # [H, K] statistics of these rows (CUDA), as stat_values
    state_stats: tuple[torch.Tensor, torch.Tensor] | None = None  # as CapturedBatch.state_stats
    ready: torch.cuda.Event | None = None

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()

    def numpy(self) -> np.ndarray:
        return to_storage_numpy(self.rows, self.dtype)


def to_storage_numpy(t: torch.Tensor, name: str) -> np.ndarray:
    """Convert a CPU float tensor to a numpy array in the storage dtype ``name``.

    numpy has no bfloat16, so ``Tensor.numpy()`` refuses torch.bfloat16; instead the bf16 bits are
    reinterpreted (torch int16 view -> numpy -> view as ml_dtypes.bfloat16). This is exact, and
    other float inputs are rounded once by torch's own cast (round-to-nearest-even, as
    ml_dtypes does), never via an extra float32 copy of a bf16 tensor.
    """
    t = t.detach()
    if name == "bfloat16":
        bits = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        return bits.view(ml_dtypes.bfloat16)
    if name == "float16":
        return t.to(torch.float16).numpy()
    if name == "float32":
        return t.to(torch.float32).numpy()
    raise GdnDumpError(f"unknown storage dtype {name!r}: expected one of {', '.join(STORAGE_DTYPES)}")


class Capture:
    """Runs prefill on padded batches and collects the selected hooks."""

    def __init__(self, bridge, hooks: list[HookSpec], storage_dtype: str, device: torch.device,
                 attention=None, stats: dict | None = None, states=None,
                 state_dtype: str = STATE_DTYPE, softmax: str = BRIDGE, matrix_rows: int = 256):
        self.bridge = bridge
        self.hooks = hooks
        self.device = device
        # an attn_capture.AttentionCapture, a contrib_capture.ContributionCapture, or None
        self.attention = attention
        self.states = states  # a state_capture.StateCapture, or None
        if states is not None:
            states.keep = self._keep_state
        self.softmax = softmax  # SDPA (no L x L scores) or BRIDGE (patterns stored): softmax_path
        self.matrix_rows = matrix_rows  # query rows per block of a stored pattern (block_rows)
        # name -> stats.ArrayStats (layout only): per-batch moments are reduced on the device
        # (see stats_device) instead of on the host; None: the host computes them
        self.stats = stats or {}
        self.dtypes = {h.name: state_dtype if h.kind == STATE else hook_dtype(h.scalar, storage_dtype)
                       for h in hooks}
        self.stop_at_layer = stop_layer(hooks, attention.forward_layers if attention else [])
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        # the state hook never fires (TransformerLens fires it only on its eager scan): the
        # snapshots come from StateCapture's hooks on the layer's inputs
        self._fwd_hooks = [(h.name, self._hook_fn(h)) for h in hooks if h.kind != STATE]
        if attention is not None:
            self._fwd_hooks += attention.fwd_hooks()
        if states is not None:
            self._fwd_hooks += states.fwd_hooks()
        self._index: torch.Tensor | None = None
        self._lengths: list[int] = []
        self._batch: CapturedBatch | None = None
        self._counts: list[tuple[tuple[str, str], torch.Tensor]] = []
        self._stream = None

    def run(self, input_ids: torch.Tensor, lengths: list[int],
            prompts: list[int] | None = None, stream=None) -> CapturedBatch:
        """``input_ids``: ``[B, T]`` right-padded; ``lengths``: the real length of each row (>= 1);
        ``prompts``: the store index of each row (default ``0..B-1``); ``stream``: called with
        each :class:`RowPiece` as the hooks fire (one prompt only), instead of keeping its rows."""
        if stream is not None and len(lengths) != 1:
            raise ValueError("only a batch of one prompt streams")
        batch_size, width = input_ids.shape
        # Flat indices of the real positions: a gather with a known size needs no device sync,
        # unlike boolean-mask indexing.
        flat = np.concatenate([np.arange(n) + b * width for b, n in enumerate(lengths)])
        # Without padding the rows are the tensor itself: skip the gather (one pass fewer).
        self._index = None if len(flat) == batch_size * width else torch.as_tensor(flat, device=self.device)
        self._lengths = list(lengths)
        tokens = input_ids.reshape(-1)[torch.as_tensor(flat)].to(torch.int32).numpy()
        self._batch = CapturedBatch(list(range(batch_size)) if prompts is None else list(prompts),
                                    list(lengths), tokens, dtypes=self.dtypes, width=width)
        self._counts = []
        if self.states is not None:
            self.states.start(lengths)
        attention = (memory_efficient_attention(self.bridge) if self.softmax == SDPA
                     else contextlib.nullcontext())
        self._stream = stream
        try:
            with torch.inference_mode(), self.bridge.hooks(fwd_hooks=self._fwd_hooks), attention:
                self.bridge(input_ids.to(self.device, non_blocking=True), use_cache=False,
                            return_type=None, stop_at_layer=self.stop_at_layer)
        finally:
            self._stream = None
        batch, self._batch = self._batch, None
        if self.states is not None:
            try:
                self.states.finish()
            except KeyError as exc:
                raise RunFailure(f"hook {exc} did not fire; the state snapshots need it") from None
        missing = [h.name for h in self.hooks
                   if h.name not in batch.rows and h.name not in batch.matrices and h.name not in batch.streamed]
        if missing:
            raise RunFailure(
                f"hook(s) did not fire: {', '.join(missing[:5])}; the GDN interior hooks fire only "
                "on the bridge's prefill path (use_cache=False)"
            )
        if self.attention is not None:
            try:
                matrices = self.attention.finish(lengths, input_ids)
            except KeyError as exc:
                raise RunFailure(f"hook {exc} did not fire; the attention matrices need it") from None
            batch.matrices.update(matrices)
        self._finish_counts(batch)
        if self.cuda:
            batch.ready = torch.cuda.Event()
            batch.ready.record(self.copy_stream)
        return batch

    def reset(self) -> None:
        """Drop a failed batch's state (its captured rows, index and overflow counts)."""
        self._batch, self._index, self._counts = None, None, []
        for part in (self.attention, self.states):
            if part is not None:
                part.reset()

    def _keep_state(self, name: str, states: torch.Tensor, stats: tuple | None) -> None:
        """A layer's snapshots ``[n, H, K, V]`` (and their statistics ``[n, H]`` each, or None) as
        rows of its array, cast and counted like any hook's rows, as soon as they are computed."""
        cast = states.to(torch_dtype(self.dtypes[name]))
        self._count_values(name, states, cast)
        if self._stream is None:
            self._batch.rows[name] = self._to_host(cast)
            if stats is not None:
                self._batch.state_stats[name] = tuple(self._to_host(s) for s in stats)
            return
        for lo, hi in self._pieces(name, cast):
            self._emit(RowPiece(0, name, self._to_host(cast[lo:hi]), self.dtypes[name],
                                state_stats=None if stats is None else
                                tuple(self._to_host(s[lo:hi]) for s in stats)))

    def _hook_fn(self, spec: HookSpec):
        if spec.kind == ATTENTION_MATRIX:
            def keep_matrix(tensor: torch.Tensor, hook) -> None:
                self._batch.matrices[spec.name] = [
                    PromptMatrix.whole(tensor[b, :, :n, :n].float().cpu().numpy(), self.matrix_rows)
                    for b, n in enumerate(self._lengths)
                ]
            return keep_matrix

        dtype = torch_dtype(self.dtypes[spec.name])

        def keep_rows(tensor: torch.Tensor, hook) -> None:
            rows = tensor.reshape(-1, *tensor.shape[2:])
            if self._index is not None:
                rows = rows.index_select(0, self._index)
            if self._stream is None:
                self._batch.rows[spec.name], moments = self._cast_to_host(spec.name, rows, dtype)
                if moments is not None:
                    self._batch.stat_values[spec.name] = moments
                return
            for lo, hi in self._pieces(spec.name, rows):
                host, moments = self._cast_to_host(spec.name, rows[lo:hi], dtype, own=True)
                self._emit(RowPiece(0, spec.name, host, self.dtypes[spec.name], moments=moments))
        return keep_rows

    def _cast_to_host(self, name: str, rows: torch.Tensor, dtype: torch.dtype, own: bool = False):
        """``rows`` cast to the storage dtype, counted, on the host, with their statistics moments
        when the device computes them (else None). ``own``: never a view of the forward's tensor
        (a streamed piece must not keep the whole activation alive until it is written)."""
        cast = rows.to(dtype)
        self._count_values(name, rows, cast)
        moments = self._to_host(batch_stats(cast, self.stats[name])) if name in self.stats else None
        if own and not self.cuda and cast.data_ptr() == rows.data_ptr():
            cast = cast.clone()
        return self._to_host(cast), moments

    def _pieces(self, name: str, rows: torch.Tensor) -> list[tuple[int, int]]:
        """Row ranges of about :data:`PIECE_BYTES` each."""
        row_bytes = max(1, int(np.prod(rows.shape[1:], dtype=np.int64)) * itemsize(self.dtypes[name]))
        step = max(1, PIECE_BYTES // row_bytes)
        return [(lo, min(lo + step, len(rows))) for lo in range(0, len(rows), step)]

    def _emit(self, piece: RowPiece) -> None:
        """Hand a streamed prompt's piece on (its copy to the host may still be running)."""
        piece.prompt = self._batch.prompts[0]
        if self.cuda:
            piece.ready = torch.cuda.Event()
            piece.ready.record(self.copy_stream)
        self._batch.streamed.add(piece.name)
        self._stream(piece)

    def _count_values(self, name: str, rows: torch.Tensor, cast: torch.Tensor) -> None:
        """Count NaN/inf the model produced, and values finite before a float16 cast and inf after.

        On CUDA the counts stay on the device (no sync). On the CPU one min/max pass over the rows
        (NaN propagates through it) rules out both for nearly every batch before a full count.
        """
        narrowing = cast.dtype == torch.float16 and rows.dtype != torch.float16
        if not self.cuda:
            if not rows.numel():
                return
            low, high = (float(x) for x in torch.aminmax(rows))
            limit = float(torch.finfo(cast.dtype).max) if narrowing else math.inf
            if math.isfinite(low) and math.isfinite(high) and -limit <= low and high <= limit:
                return
        self._counts.append(((NONFINITE, name), (~torch.isfinite(rows)).sum()))
        if narrowing:
            self._counts.append(((OVERFLOW, name), (torch.isinf(cast) & torch.isfinite(rows)).sum()))

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(self.copy_stream)  # keep the device memory until the copy is done
        return host

    def _finish_counts(self, batch: CapturedBatch) -> None:
        if not self._counts:
            return
        batch.count_keys = [key for key, _ in self._counts]
        counts = torch.stack([count for _, count in self._counts])
        batch.count_values = self._to_host(counts) if self.cuda else counts


def softmax_path(hooks: list[HookSpec], matrices) -> str:
    """How softmax-attention layers run: :data:`SDPA` (memory linear in the prompt's length)
    unless a stored array needs their scores or pattern (``hook_pattern``, ``hook_attn_scores``, a
    softmax layer's ``attn_matrix``), which only TransformerLens's explicit path has."""
    needs = any(h.kind == ATTENTION_MATRIX for h in hooks) or any(a.layer_type == ATTENTION
                                                                 for a in matrices)
    return BRIDGE if needs else SDPA


def stop_layer(hooks: list[HookSpec], extra_layers: list[int] = ()) -> int | None:
    """Stop the forward after the last layer that has a selected hook (skips the unembed)."""
    if any(h.layer_type == MODEL for h in hooks):
        return None
    return max([h.layer for h in hooks] + list(extra_layers)) + 1


def pad_batch(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, list[int]]:
    """Right-pad ``token_lists`` into ``[B, T_max]``."""
    lengths = [len(t) for t in token_lists]
    out = torch.full((len(token_lists), max(lengths)), pad_id, dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        out[i, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
    return out, lengths
