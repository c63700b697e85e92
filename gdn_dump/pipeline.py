"""The extract loop: prompts -> plan -> batches -> capture -> writer -> finalized store.

The library does the work and reports through a :class:`Reporter`; the CLI only supplies a rich one.
"""

from __future__ import annotations

import importlib.util
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .capture import Capture
from .attn_capture import RESIDUAL_LIMIT, AttentionCapture, check_budget, select_attn_layers
from .catalogue import Catalogue
from .errors import GdnDumpError, RunFailure
from .models import LoadedModel, load_config, load_model, load_tokenizer
from .plan import Plan, check_free_space, make_plan
from .prompts import PromptSource, open_prompts
from .schedule import HalvingRunner, batches
from .sink import BatchSink
from .store import (
    COMPLETE,
    FAILED,
    WRITERS,
    RowWriter,
    check_out,
    compressors_for,
    create_store,
    now_iso,
    provenance_base,
    set_status,
)

TOKENIZE_BLOCK = 512


@dataclass
class ExtractOptions:
    """Everything ``gdn-dump extract`` takes; the names are the CLI option names."""

    model: str
    prompts: str
    out: str
    hooks: str | None = None
    layers: str | None = None
    revision: str | None = None
    device: str = "auto"
    model_dtype: str | None = None
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    kernels: str = "auto"
    text_field: str = "text"
    max_length: int | None = None
    batch_size: int = 8
    max_batch_tokens: int | None = None
    # Prompts run longest first within windows of this many bytes of rows (0: file order); the
    # sink holds at most one window to put rows back in prompt order.
    sort_window_bytes: int = 1 << 30
    dtype: str = "float16"
    chunk_tokens: int | None = None
    shard_tokens: int | None = None
    compressor: str = "none"
    # Who writes the chunks (zarr-python always creates the arrays): TensorStore's zarr3 driver by
    # default, measured 1.13x faster end to end on the CPU bench with byte-identical stores.
    writer: str = "tensorstore"
    overwrite: bool = False
    dry_run: bool = False
    force: bool = False
    attn_layers: str | None = None  # layers whose attention matrix is stored ("all", lists)
    attn_heads: str | None = None
    attn_mode: str = "exact"  # or "heuristic" (TransformerLens's formula)
    attn_method: str = "chunked"  # or closed_form
    attn_precision: str = "float32"
    max_attn_bytes: int = 16 << 30
    command_line: list[str] = field(default_factory=list)


@dataclass
class ExtractResult:
    plan: Plan
    out: Path
    seconds: float = 0.0
    tokens: int = 0
    prompts: int = 0
    bytes_written: int = 0
    overflow: dict[str, int] = field(default_factory=dict)
    residuals: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # max, sum, n
    oom_retries: int = 0
    padding: float = 0.0  # share of padded positions in the batches run
    peak_held_bytes: int = 0  # rows held for reordering, at most
    peak_rss: int = 0
    model: LoadedModel | None = None


class Reporter:
    """Progress callbacks; the default reports nothing (library use, ``--quiet``)."""

    def start(self, n_prompts: int, n_tokens: int) -> None: ...
    def advance(self, prompts: int, tokens: int, bytes_written: int) -> None: ...
    def note(self, message: str) -> None: ...
    def finish(self) -> None: ...


def extract(opts: ExtractOptions, reporter: Reporter | None = None,
            model: LoadedModel | None = None) -> ExtractResult:
    """Run ``gdn-dump extract``: plan, create the store, stream every batch into it, finalize.

    Everything a user can get wrong is checked before the weights load: the output path, the
    prompt file, the hook and layer selection, the matrix budget and the free disk space.
    """
    reporter = reporter or Reporter()
    _validate(opts)
    if not opts.dry_run:
        check_out(opts.out, overwrite=opts.overwrite)
    with open_prompts(opts.prompts, text_field=opts.text_field) as source:
        if model is None:
            config = load_config(opts.model, revision=opts.revision,
                                 trust_remote_code=opts.trust_remote_code)
            tokenizer = load_tokenizer(opts.model, revision=opts.revision,
                                       trust_remote_code=opts.trust_remote_code)
        else:
            config, tokenizer = model.config, model.tokenizer
        plan = plan_run(opts, Catalogue(config), tokenizer, source)
        result = ExtractResult(plan=plan, out=Path(opts.out), model=model)
        check_budget(plan, opts.max_attn_bytes)
        if opts.dry_run:
            return result
        if not opts.force:
            check_free_space(opts.out, plan.total_bytes)
        model = result.model = model or load_model(
            opts.model, revision=opts.revision, device=opts.device, model_dtype=opts.model_dtype,
            trust_remote_code=opts.trust_remote_code, allow_pickle_weights=opts.allow_pickle_weights,
            kernels=opts.kernels,
        )
        provenance = _provenance(opts, model, plan, source)
        group = create_store(opts.out, plan, provenance, overwrite=opts.overwrite,
                             compressor=opts.compressor, prompt_ids=(p.id for p in source))
        _run(opts, model, plan, source, group, result, reporter)
    _finalize(group, plan, result)
    return result


def _finalize(group, plan: Plan, result: ExtractResult) -> None:
    """Record the faithfulness of the matrices; ``complete`` only if every check holds."""
    failures = []
    for a in plan.attn_layers:
        stats = result.residuals.get(a.name)
        if stats is None:
            continue
        worst, total, count = stats
        group[a.name].attrs.update({"residual_max": worst, "residual_mean": total / max(count, 1),
                                    "residual_limit": RESIDUAL_LIMIT})
        if worst > RESIDUAL_LIMIT:
            failures.append(f"{a.name}: ||M V - o|| / ||o|| = {worst:.2e}")
    common = dict(finished=now_iso(), seconds=round(result.seconds, 3), overflow=result.overflow,
                  oom_retries=result.oom_retries, padding=round(result.padding, 4),
                  peak_rss_bytes=result.peak_rss)
    if failures:
        message = (f"the effective attention does not reproduce the layer output (limit "
                   f"{RESIDUAL_LIMIT:g}): {'; '.join(failures)}")
        set_status(group, FAILED, failure=message, **common)
        raise RunFailure(message)
    set_status(group, COMPLETE, **common)


def _validate(opts: ExtractOptions) -> None:
    compressors_for(opts.compressor)
    if opts.writer not in WRITERS:
        raise GdnDumpError(f"--writer must be one of {', '.join(WRITERS)}, not {opts.writer!r}")
    if opts.writer == "tensorstore" and importlib.util.find_spec("tensorstore") is None:
        raise GdnDumpError("--writer tensorstore needs TensorStore: pip install tensorstore")
    if opts.batch_size < 1:
        raise GdnDumpError(f"--batch-size must be at least 1, not {opts.batch_size}")
    if opts.max_batch_tokens is not None and opts.max_batch_tokens < 1:
        raise GdnDumpError(f"--max-batch-tokens must be at least 1, not {opts.max_batch_tokens}")
    if opts.sort_window_bytes < 0:
        raise GdnDumpError(f"--sort-window must be 0 (off) or a size, not {opts.sort_window_bytes}")
    if opts.max_length is not None and opts.max_length < 1:
        raise GdnDumpError(f"--max-length must be at least 1, not {opts.max_length}")


def plan_run(opts: ExtractOptions, catalogue: Catalogue, tokenizer, source: PromptSource) -> Plan:
    """Resolve the selection, tokenise every prompt once for its length, lay out the store."""
    attn_layers = (select_attn_layers(catalogue, opts.attn_layers, opts.attn_heads)
                   if opts.attn_layers else [])
    hooks = catalogue.select(opts.hooks, opts.layers, allow_empty=bool(attn_layers))
    lengths = np.empty(source.count, dtype=np.int64)
    truncated = 0
    for start, token_lists, raw_lengths in _tokenized_blocks(source, tokenizer, opts.max_length):
        lengths[start:start + len(token_lists)] = [len(t) for t in token_lists]
        truncated += sum(raw > len(t) for raw, t in zip(raw_lengths, token_lists))
    return make_plan(hooks, lengths, storage_dtype=opts.dtype, chunk_tokens=opts.chunk_tokens,
                     shard_tokens=opts.shard_tokens,
                     max_length=opts.max_length, truncated=truncated, attn_layers=attn_layers,
                     attn_mode=opts.attn_mode)


def _tokenized_blocks(source: Iterable, tokenizer, max_length: int | None):
    """Yield ``(first_index, token_lists, untruncated_lengths)`` for blocks of prompts."""
    block: list[str] = []
    start = 0
    for prompt in source:
        block.append(prompt.text)
        if len(block) == TOKENIZE_BLOCK:
            yield start, *_tokenize(tokenizer, block, max_length)
            start += len(block)
            block = []
    if block:
        yield start, *_tokenize(tokenizer, block, max_length)


def _tokenize(tokenizer, texts: list[str], max_length: int | None):
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    raw = [len(t) for t in ids]
    if max_length is not None:
        ids = [t[:max_length] for t in ids]
    return ids, raw


def tokenized(source: Iterable, tokenizer, max_length: int | None) -> Iterator[tuple[int, list[int]]]:
    """``(prompt_index, token_ids)`` for every prompt, in file order (tokenised in blocks)."""
    for start, token_lists, _ in _tokenized_blocks(source, tokenizer, max_length):
        yield from enumerate(token_lists, start)


def window_tokens(opts: ExtractOptions, plan: Plan) -> int | None:
    """Tokens per sorting window: ``--sort-window`` bytes of rows (None: no sorting)."""
    if not opts.sort_window_bytes:
        return None
    return max(1, opts.sort_window_bytes // max(plan.bytes_per_token, 1))


def _run(opts, model: LoadedModel, plan: Plan, source, group, result: ExtractResult,
         reporter: Reporter) -> None:
    attention = (AttentionCapture(plan.attn_layers, mode=opts.attn_mode, method=opts.attn_method,
                                  precision=opts.attn_precision) if plan.attn_layers else None)
    capture = Capture(model.bridge, plan.hooks, plan.storage_dtype, model.device, attention)
    pad_id = model.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    writer = RowWriter(group, plan.arrays, engine=opts.writer)
    sink = BatchSink(writer, plan, result)
    runner = HalvingRunner(capture, pad_id, reporter.note)
    reporter.start(plan.n_prompts, plan.n_rows)
    started = time.perf_counter()
    real = padded = 0
    try:
        for batch in batches(tokenized(source, model.tokenizer, opts.max_length), opts.batch_size,
                             opts.max_batch_tokens, window_tokens(opts, plan)):
            for captured in runner.run(batch):
                sink.put(captured)
            lengths = [len(t) for _, t in batch]
            real += sum(lengths)
            padded += max(lengths) * len(lengths)
            result.prompts += len(batch)
            result.tokens += sum(lengths)
            reporter.advance(len(batch), sum(lengths), writer.bytes_written)
        sink.close(end_prompt=plan.n_prompts)
        writer.close()
    except BaseException:
        sink.abort()
        writer.abort()
        raise
    finally:
        reporter.finish()
        result.oom_retries = runner.retries
    result.seconds = time.perf_counter() - started
    result.bytes_written = writer.bytes_written
    result.padding = 1 - real / padded if padded else 0.0
    result.peak_held_bytes = sink.peak_held_bytes
    result.peak_rss = peak_rss()


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _provenance(opts: ExtractOptions, model: LoadedModel, plan: Plan, source) -> dict:
    return {
        **provenance_base(opts.command_line),
        "model": model.info,
        "hooks": [h.name for h in plan.hooks],
        "layers": sorted({h.layer for h in plan.hooks if h.layer is not None}),
        "storage_dtype": plan.storage_dtype,
        "compressor": opts.compressor,
        "writer": opts.writer,
        "prompts": {"path": str(source.display), "sha256": source.sha256, "count": source.count,
                    "format": source.format, "text_field": opts.text_field},
        "max_length": opts.max_length,
        "truncated": plan.truncated,
        "n_rows": plan.n_rows,
        "batch_size": opts.batch_size,
        "attention": {"layers": [a.layer for a in plan.attn_layers], "mode": opts.attn_mode,
                      "method": opts.attn_method, "precision": opts.attn_precision}
        if plan.attn_layers else None,
        "max_batch_tokens": opts.max_batch_tokens,
        "sort_window_bytes": opts.sort_window_bytes,
    }
