"""The extract loop: prompts -> plan -> batches -> capture -> writer -> finalized store.

The library does the work and reports through a :class:`Reporter`; the CLI only supplies a rich one.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr

from .attn_capture import (
    RESIDUAL_LIMIT,
    AttentionCapture,
    check_budget,
)
from .capture import Capture
from .options import ExtractOptions, resolve
from ..catalogue import Catalogue
from .session import Session, fault, fingerprint, open_session, signals_as_exceptions
from ..errors import GdnDumpError, RunFailure, Terminated
from ..store.ledger import finalize, read_record, region_status, write_record
from ..model.load import (
    LoadedModel,
    catalogue,
    load_config,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_model_dtype,
)
from ..store.layout import Plan, check_free_space, make_plan
from .prompts import PromptSource, open_prompts
from .schedule import HalvingRunner, units
from .sink import BatchSink, UnitEnd
from ..ops.stats import for_arrays, from_json, to_json
from ..store.create import ATTR, COMPLETE, FAILED, check_out, has_store, open_group
from ..store.provenance import provenance_base
from .tokens import describe, tokenized, tokenized_blocks
from .split import Barrier, WorkSplit, detect_split, split_regions
from ..store.writer import RowWriter

@dataclass
class ExtractResult:
    plan: Plan
    out: str
    seconds: float = 0.0
    tokens: int = 0
    prompts: int = 0
    bytes_written: int = 0
    overflow: dict[str, int] = field(default_factory=dict)  # finite values cast to inf, per array
    nonfinite: dict[str, int] = field(default_factory=dict)  # NaN/inf from the model, per array
    residuals: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # max, sum, n
    oom_retries: int = 0
    replaced_lines: int = 0  # prompt lines with invalid UTF-8 read with U+FFFD (--encoding-errors)
    padding: float = 0.0  # share of padded positions in the batches run
    peak_held_bytes: int = 0  # rows held for reordering, at most
    peak_rss: int = 0
    model: LoadedModel | None = None
    split: WorkSplit | None = None
    session: Session | None = None
    status: str = "in_progress"  # of the whole store once this process is done
    pending_regions: list[int] = field(default_factory=list)  # regions other processes still run


class Reporter:
    """Progress callbacks; the default reports nothing (library use, ``--quiet``)."""

    def start(self, n_prompts: int, n_tokens: int) -> None: ...
    def advance(self, prompts: int, tokens: int, bytes_written: int) -> None: ...
    def note(self, message: str) -> None: ...
    def finish(self) -> None: ...


def extract(opts: ExtractOptions, reporter: Reporter | None = None,
            model: LoadedModel | None = None) -> ExtractResult:
    """Run ``gdn-dump extract`` in this process: plan, create or join the store, stream this
    process's region into it, and finalize the store if it was the last region to finish.

    Everything a user can get wrong is checked before the weights load: the output path, the
    prompt file, the hook and layer selection, the matrix budget and the free disk space.
    """
    reporter = reporter or Reporter()
    opts = resolve(opts)
    split = detect_split(opts.shard)
    fresh = split.creator and not (opts.resume and has_store(opts.out))
    if not opts.dry_run and fresh:
        check_out(opts.out, overwrite=opts.overwrite)
    with open_prompts(opts.prompts, text_field=opts.text_field,
                      encoding_errors=opts.encoding_errors) as source:
        if model is None:
            config = load_config(opts.model, revision=opts.revision,
                                 trust_remote_code=opts.trust_remote_code)
            tokenizer = load_tokenizer(opts.model, revision=opts.revision,
                                       trust_remote_code=opts.trust_remote_code)
        else:
            config, tokenizer = model.config, model.tokenizer
        plan = plan_run(opts, catalogue(config), tokenizer, source, split.count)
        result = ExtractResult(plan=plan, out=opts.out, model=model, split=split,
                               replaced_lines=source.replaced_lines)
        check_budget(plan, opts.max_attn_bytes)
        if opts.dry_run:
            return result
        if not opts.force and fresh:
            check_free_space(opts.out, plan.total_bytes)
        device = _device_for(opts.device, split)
        fp = fingerprint(opts, plan, source, split,
                         str(model.dtype if model else resolve_model_dtype(opts.model_dtype, device)))
        model = result.model = model or load_model(
            opts.model, revision=opts.revision, device=str(device), model_dtype=opts.model_dtype,
            trust_remote_code=opts.trust_remote_code, allow_pickle_weights=opts.allow_pickle_weights,
            kernels=opts.kernels,
        )
        barrier = Barrier(split, opts.wait_timeout)
        try:
            session = open_session(opts, plan, source, split, fp,
                                   _provenance(opts, model, plan, source, split), barrier)
            result.session = session
            if not session.region_done and not session.store_complete:
                with signals_as_exceptions():
                    _run(opts, model, plan, source, session, result, reporter)
        finally:
            barrier.close()
    if session.store_complete:
        result.status = COMPLETE
        return result
    fault("before-finalize")
    records, pending = region_status(session.group)
    result.pending_regions = pending
    if not pending:
        result.status = finalize(session.group, RESIDUAL_LIMIT)
        if result.status == FAILED:
            raise RunFailure(session.group.attrs[ATTR]["failure"])
    return result


def finalize_store(path: str | Path) -> str:
    """``gdn-dump finalize``: mark a store whose regions are all done ``complete``; idempotent."""
    group = open_group(path, mode="r+")
    status = finalize(group, RESIDUAL_LIMIT)
    if status == FAILED:
        raise RunFailure(group.attrs[ATTR]["failure"])
    return status


def _device_for(device: str, split: WorkSplit) -> torch.device:
    """Under torchrun, ``--device auto`` means this process's GPU (``LOCAL_RANK``)."""
    if device == "auto" and split.local_rank is not None and torch.cuda.is_available():
        return torch.device("cuda", split.local_rank % torch.cuda.device_count())
    return resolve_device(device)


def plan_run(opts: ExtractOptions, catalogue: Catalogue, tokenizer, source: PromptSource,
             processes: int = 1) -> Plan:
    """Resolve the selection, tokenise every prompt once for its length, lay out the store
    (with ``processes`` regions, each starting on a chunk boundary)."""
    option = "--layer" if opts.command == "attn-matrix" else "--attn-layers"
    attn_layers = (catalogue.select_matrices(opts.attn_layers, opts.attn_heads, option)
                   if opts.attn_layers else [])
    hooks = catalogue.select(opts.hooks, opts.layers, allow_empty=bool(attn_layers))
    lengths = np.empty(source.count, dtype=np.int64)
    raw = np.empty(source.count, dtype=np.int64)
    for start, token_lists, raw_lengths in tokenized_blocks(source, tokenizer, opts.max_length,
                                                             opts.on_long):
        lengths[start:start + len(token_lists)] = [len(t) for t in token_lists]
        raw[start:start + len(token_lists)] = raw_lengths
    long = raw > opts.max_length if opts.max_length is not None else np.zeros(len(raw), bool)
    if opts.on_long == "error" and long.any():
        first = int(np.argmax(long))
        raise GdnDumpError(
            f"{source.display}: prompt {describe(source, first)} has {int(raw[first])} tokens, over "
            f"--max-length {opts.max_length} ({int(long.sum())} prompt(s) in all); pass --on-long "
            "truncate or skip to go on"
        )
    truncated, skipped = (int(long.sum()), 0) if opts.on_long == "truncate" else (0, int(long.sum()))
    layout = dict(storage_dtype=opts.dtype, chunk_tokens=opts.chunk_tokens,
                  shard_tokens=opts.shard_tokens, max_length=opts.max_length, truncated=truncated,
                  skipped=skipped, attn_layers=attn_layers, attn_mode=opts.attn_mode)
    plan = make_plan(hooks, lengths, **layout)
    if processes == 1:
        return plan
    starts = [min(p for batch in unit for p, _ in batch) for unit in plan_units(opts, plan)]
    regions = split_regions(starts, lengths, processes, cut_every=plan.prompt_chunk)
    return make_plan(hooks, lengths, regions=regions, **layout)


def plan_units(opts: ExtractOptions, plan: Plan, items=None):
    """The units of the run (see :mod:`gdn_dump.schedule`); by default from lengths alone."""
    if items is None:
        items = ((p, range(n)) for p, n in enumerate(plan.prompt_lengths.tolist()))
    return units(items, opts.batch_size, opts.max_batch_tokens, window_tokens(opts, plan),
                 plan.prompt_chunk)


def window_tokens(opts: ExtractOptions, plan: Plan) -> int | None:
    """Tokens per sorting window: ``--sort-window`` bytes of rows (None: no sorting)."""
    if not opts.sort_window_bytes:
        return None
    return max(1, opts.sort_window_bytes // max(plan.bytes_per_token, 1))


def _run(opts, model: LoadedModel, plan: Plan, source, session: Session, result: ExtractResult,
         reporter: Reporter) -> None:
    """Capture and write the units of this process's region, from ``session.resume_from`` on."""
    attention = (AttentionCapture(plan.attn_layers, mode=opts.attn_mode, method=opts.attn_method,
                                  precision=opts.attn_precision) if plan.attn_layers else None)
    capture = Capture(model.bridge, plan.hooks, plan.storage_dtype, model.device, attention,
                      stats=for_arrays(plan.arrays) if opts.stats and stats_on_device(model.device) else None)
    pad_id = model.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    first, hi = session.resume_from, session.hi
    start_row = int(plan.prompt_starts[first]) if first < plan.n_prompts else plan.n_rows
    writer = RowWriter(session.group, plan.arrays, start_row=start_row, start_prompt=first,
                       engine=opts.writer)
    checkpoints = [0]

    local = isinstance(session.group.store, zarr.storage.LocalStore)

    def record(resume_from: int, stats, done: bool = False) -> None:  # on the writer thread
        if local:  # chunk files are written without fsync: make them durable before claiming them
            os.sync()
        write_record(session.group, session.region, {
            "prompts": [session.lo, hi], "rows": list(plan.region_rows(session.region)),
            "resume_from": resume_from, "done": done,
            "tokens": int(plan.prompt_lengths[session.lo:resume_from].sum()),
            "overflow": dict(result.overflow), "nonfinite": dict(result.nonfinite),
            "oom_retries": runner.retries,
            "seconds": round(time.perf_counter() - started, 3),
            "padding": round(_padding(real, padded), 4), "peak_rss": peak_rss(),
            "stats": to_json(stats) if stats is not None else None,
        })
        checkpoints[0] += 1
        fault(f"after-checkpoint:{checkpoints[0]}")

    sink = BatchSink(writer, plan, result, start_prompt=first, checkpoint=record,
                     checkpoint_every=opts.checkpoint_every, fail_on_nonfinite=opts.fail_on_nonfinite,
                     stats=_resumed_stats(session, plan) if opts.stats else {})
    runner = HalvingRunner(capture, pad_id, reporter.note)
    todo = plan.prompt_starts[hi - 1] + plan.prompt_lengths[hi - 1] - start_row if hi > first else 0
    reporter.start(hi - first, int(todo))
    started = time.perf_counter()
    real = padded = 0
    items = tokenized(source, model.tokenizer, opts.max_length, plan.prompt_lengths, first, hi,
                      opts.on_long)
    try:
        for unit in plan_units(opts, plan, items):
            unit_lo = min(p for batch in unit for p, _ in batch)
            if unit_lo < first:
                continue
            if unit_lo >= hi:
                break
            for batch in unit:
                for captured in runner.run(batch):
                    sink.put(captured)
                lengths = [len(t) for _, t in batch]
                real += sum(lengths)
                padded += max(lengths) * len(lengths)
                result.prompts += len(batch)
                result.tokens += sum(lengths)
                reporter.advance(len(batch), sum(lengths), writer.bytes_written)
            sink.put(UnitEnd(max(p for batch in unit for p, _ in batch) + 1))
        sink.close(end_prompt=hi)
        writer.close()
    except (KeyboardInterrupt, Terminated):
        _flush_on_signal(sink, writer, record)
        raise
    except BaseException:
        sink.abort()
        writer.abort()
        raise
    finally:
        reporter.finish()
        result.oom_retries = runner.retries
    result.bytes_written = writer.bytes_written
    result.padding = _padding(real, padded)
    result.peak_held_bytes = sink.peak_held_bytes
    result.peak_rss = peak_rss()
    with writer.failures("recording progress"):
        record(hi, sink.stats, done=True)
    result.seconds += time.perf_counter() - started  # up to durable: the last record syncs


def _flush_on_signal(sink: BatchSink, writer: RowWriter, record) -> None:
    """On SIGINT / SIGTERM: write what was captured, record the last whole unit, leave resumable."""
    try:
        sink.close(strict=False)
        writer.checkpoint(lambda: record(sink.last_unit_end, sink.unit_stats))
        writer.close()
    except BaseException:  # the signal's exit code matters more than a second failure
        sink.abort()
        writer.abort()


def stats_on_device(device: torch.device) -> bool:
    """Reduce the statistics where the rows are on a GPU (a few small kernels per hook) rather than
    on one host core (about 0.6 GB/s, below a GPU run's write rate)."""
    return device.type == "cuda"


def _resumed_stats(session: Session, plan: Plan):
    """The statistics of the rows before ``session.resume_from``: empty at the region's start,
    else those of its record (written with that ``resume_from``)."""
    if session.resume_from <= session.lo:
        return None  # fresh accumulators
    record = read_record(session.group, session.region) or {}
    state = record.get("stats")
    fresh = for_arrays(plan.arrays)
    if not state or set(state) != set(fresh):  # a record without statistics: none for the region
        return {}
    return from_json(state)


def _padding(real: int, padded: int) -> float:
    return 1 - real / padded if padded else 0.0


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _provenance(opts: ExtractOptions, model: LoadedModel, plan: Plan, source,
                split: WorkSplit) -> dict:
    return {
        **provenance_base(opts.command_line),
        "model": model.info,
        "hooks": [h.name for h in plan.hooks],
        "layers": sorted({h.layer for h in plan.hooks if h.layer is not None}),
        "storage_dtype": plan.storage_dtype,
        "compressor": opts.compressor,
        "writer": opts.writer,
        "prompts": {"path": str(source.display), "sha256": source.sha256, "count": source.count,
                    "format": source.format, "text_field": opts.text_field,
                    "encoding_errors": opts.encoding_errors, "replaced_lines": source.replaced_lines},
        "max_length": opts.max_length,
        "on_long": opts.on_long,
        "truncated": plan.truncated,
        "skipped_long": plan.skipped,
        "fail_on_nonfinite": opts.fail_on_nonfinite,
        "n_rows": plan.n_rows,
        "batch_size": opts.batch_size,
        "attention": {"layers": [a.layer for a in plan.attn_layers],
                      "heads": {str(a.layer): list(a.heads) for a in plan.attn_layers},
                      "mode": opts.attn_mode,
                      "method": opts.attn_method, "precision": opts.attn_precision}
        if plan.attn_layers else None,
        "max_batch_tokens": opts.max_batch_tokens,
        "sort_window_bytes": opts.sort_window_bytes,
        "processes": {"count": split.count, "launcher": split.launcher,
                      "regions": [list(r) for r in plan.regions]},
    }
