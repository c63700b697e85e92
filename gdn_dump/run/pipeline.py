"""The extract loop: prompts -> plan -> batches -> capture -> sink -> writer -> finalized store.

:func:`extract` decides each question once, in order: the options (:func:`~.options.resolve`),
this process's share (:func:`~.split.detect_split`), what to do with ``--out``
(:func:`~.session.decide`), the plan (:func:`~.plan.plan_run`); then it loads the model, opens
the session and runs its region (:func:`run_region`). The library does the work and reports
through a :class:`Reporter`; the CLI only supplies a rich one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import RunFailure, Terminated
from ..model.kernels import uses_fla
from ..model.load import LoadedModel, catalogue, load_config, load_model, load_tokenizer, resolve_model_dtype
from ..dtypes import STATE_DTYPE
from ..ops.stats import for_arrays
from ..store.create import ATTR, COMPLETE, FAILED
from ..store.finalize import finalize
from ..store.layout import Plan
from ..store.ledger import region_status
from ..store.provenance import provenance_base
from ..store.tally import Tally
from ..store.writer import RowWriter
from .attn_capture import AttentionCapture, block_rows
from .contrib_capture import ContributionCapture
from .capture import Capture, softmax_path
from .state_capture import StateCapture
from .options import ExtractOptions, resolve
from .result import ExtractResult, Reporter
from .memory import MemoryEstimate, estimate_memory, report_lengths
from .plan import check_free_space, plan_run, plan_units, stream_tokens
from .inputs import InputPlan, region_items
from .options import fields
from .sources import Corpus, open_corpus
from .schedule import HalvingRunner, streams
from .session import (Clock, ProgressRecorder, Session, Start, decide, fault, fingerprint,
                      open_session, peak_rss, resumable, signals_as_exceptions, state_provenance)
from .sink import BatchSink, UnitEnd
from .split import Barrier, WorkSplit, detect_split, device_for
from .tokens import Encoder


@dataclass(frozen=True)
class RegionWork:
    """What :func:`run_region` did: the tallies before and after, and the writer's figures."""

    before: Tally
    after: Tally
    bytes_written: int
    peak_held_bytes: int
    peak_rss: int


def extract(opts: ExtractOptions, reporter: Reporter | None = None,
            model: LoadedModel | None = None) -> ExtractResult:
    """Run ``gdn-dump extract`` in this process: plan, create or join the store, stream this
    process's region into it, and finalize the store if it was the last region to finish.

    Everything a user can get wrong is checked before the weights load: the options, the output
    path, the prompt file, the hook and layer selection, the matrix budget, the free disk space, and
    whether a store to ``--resume`` was written with the same settings.
    """
    reporter = reporter or Reporter()
    opts = resolve(opts)
    split = detect_split(opts.shard)
    start, loc = decide(opts, split)
    with open_corpus(opts.prompts, fields=fields(opts), encoding_errors=opts.encoding_errors) as source:
        config, tokenizer = ((model.config, model.tokenizer) if model is not None else
                             _config_and_tokenizer(opts))
        encode = encoder(opts, tokenizer, config)
        plan, inputs = plan_run(opts, catalogue(config), encode, source, split.count,
                                getattr(config, "max_position_embeddings", None), split.index)
        if opts.dry_run:
            return ExtractResult(plan, opts.out, split, replaced_lines=source.replaced_lines,
                                 memory=plan_memory(opts, config, plan, split))
        if start is Start.CREATE and not opts.force:
            check_free_space(loc, plan.total_bytes)
        device = device_for(opts.device, split)
        model_dtype = model.dtype if model is not None else resolve_model_dtype(opts.model_dtype, device)
        fp = fingerprint(opts, plan, source, split, str(model_dtype), inputs)
        resumed = resumable(opts, loc, fp) if start is Start.RESUME else None
        model = model or load_model(
            opts.model, revision=opts.revision, device=str(device), model_dtype=opts.model_dtype,
            trust_remote_code=opts.trust_remote_code, allow_pickle_weights=opts.allow_pickle_weights,
            kernels=opts.kernels,
        )
        with Barrier(split, opts.wait_timeout) as barrier:
            session = open_session(opts, start, loc, plan, inputs.prompt_ids(source), split, fp,
                                   run_provenance(opts, model, plan, source, split, inputs),
                                   barrier, resumed=resumed, on_open=reporter.opened)
            work = None
            if not session.region_done and not session.store_complete:
                with signals_as_exceptions():
                    work = run_region(opts, model, plan, Input(source, encode, inputs), session,
                                      reporter)
    result = _result(opts, plan, split, model, session, work, source.replaced_lines)
    return _finish(result, session)


def plan_memory(opts: ExtractOptions, config, plan: Plan, split: WorkSplit,
                lengths: list[int] | None = None) -> list[MemoryEstimate]:
    """What one prompt needs, at each of ``lengths`` (default: the plan's longest prompt and 4k /
    32k / 128k tokens), on the device this process would run on (see :mod:`.memory`)."""
    device = device_for(opts.device, split)
    dtype = str(resolve_model_dtype(opts.model_dtype, device)).removeprefix("torch.")
    if lengths is None:
        longest = int(plan.prompt_lengths.max()) if plan.n_prompts else 0
        lengths = report_lengths(longest, getattr(config, "max_position_embeddings", None))
    return [estimate_memory(config, plan, n, model_dtype=dtype, device=device.type,
                            fla=uses_fla(device, opts.kernels),
                            softmax=softmax_path(plan.hooks, plan.layer_products),
                            stream_from=stream_tokens(opts, plan.bytes_per_token))
            for n in lengths]


def encoder(opts: ExtractOptions, tokenizer, config) -> Encoder:
    """How this run's documents become token ids (:class:`~.tokens.Encoder`)."""
    return Encoder(tokenizer, fields(opts).mode, packed=opts.context_size is not None,
                   vocab_size=getattr(config, "vocab_size", None),
                   add_generation_prompt=opts.add_generation_prompt, model=opts.model)


@dataclass(frozen=True)
class Input:
    """What a region reads: the corpus, how it is encoded, and what the plan kept of it."""

    corpus: Corpus
    encode: Encoder
    plan: InputPlan


def _config_and_tokenizer(opts: ExtractOptions):
    """The text config and tokenizer (no weights): enough to plan."""
    kwargs = dict(revision=opts.revision, trust_remote_code=opts.trust_remote_code)
    return load_config(opts.model, **kwargs), load_tokenizer(opts.model, **kwargs)


def _result(opts, plan, split, model, session, work: RegionWork | None,
            replaced_lines: int) -> ExtractResult:
    result = ExtractResult(plan, opts.out, split, model=model, session=session,
                           replaced_lines=replaced_lines)
    if work is None:
        return result
    done = work.after.minus(work.before)
    result.prompts, result.tokens, result.seconds = done.prompts, done.tokens, done.seconds
    result.overflow, result.nonfinite = work.after.overflow, work.after.nonfinite
    result.residuals, result.oom_retries = work.after.residuals, work.after.oom_retries
    result.padding = work.after.padding
    result.bytes_written, result.peak_held_bytes = work.bytes_written, work.peak_held_bytes
    result.peak_rss = work.peak_rss
    return result


def _finish(result: ExtractResult, session: Session) -> ExtractResult:
    """Finalize the store if this process's region was the last one to finish."""
    if session.store_complete:
        result.status = COMPLETE
        return result
    fault("before-finalize")
    _, result.pending_regions = region_status(session.group)
    if not result.pending_regions:
        result.status = finalize(session.group)
        if result.status == FAILED:
            raise RunFailure(session.group.attrs[ATTR]["failure"])
    return result


def run_region(opts: ExtractOptions, model: LoadedModel, plan: Plan, source: Input,
               session: Session, reporter: Reporter) -> RegionWork:
    """Capture and write the units of this process's region, from ``session.resume_from`` on."""
    first, hi = session.resume_from, session.hi
    starts = plan.start_rows(first)
    start_row = starts["token"]
    writer = RowWriter(session.group, plan.arrays, starts=starts, engine=opts.writer)
    recorder = ProgressRecorder(session, plan)
    before = session.resumed_tally()
    row_documents = {} if source.plan.packing is not None else None
    sink = BatchSink(writer, plan, start_prompt=first, recorder=recorder,
                     checkpoint_every=opts.checkpoint_every, fail_on_nonfinite=opts.fail_on_nonfinite,
                     stats=session.resumed_stats(plan) if opts.stats else {},
                     tally=before.snapshot(), clock=Clock(before.seconds),
                     row_documents=row_documents)
    runner = HalvingRunner(_capture(opts, model, plan), _pad_id(model.tokenizer), reporter.note)
    todo = plan.prompt_starts[hi - 1] + plan.prompt_lengths[hi - 1] - start_row if hi > first else 0
    reporter.start(hi - first, int(todo))
    try:
        _feed(opts, plan, source, session, row_documents, runner, sink, writer, reporter)
        sink.close(end_prompt=hi)
        writer.close()
    except (KeyboardInterrupt, Terminated):
        _flush_on_signal(sink, writer, recorder)
        raise
    except BaseException:
        sink.abort()
        writer.abort()
        raise
    finally:
        reporter.finish()
    after = sink.tally  # the sink thread has ended: this thread owns it now
    after.seconds = sink.clock.seconds()
    with writer.failures("recording progress"):
        recorder.record(hi, sink.stats, after, done=True)
    after.seconds = sink.clock.seconds()  # up to durable: the last record syncs
    return RegionWork(before, after, writer.bytes_written, sink.peak_held_bytes, peak_rss())


def _feed(opts, plan: Plan, source: Input, session: Session, row_documents: dict | None,
          runner: HalvingRunner, sink: BatchSink, writer: RowWriter, reporter: Reporter) -> None:
    """Run every unit of the region from ``resume_from`` on and hand the batches to the sink."""
    first, hi = session.resume_from, session.hi
    # packed contexts are cut from the region's start (where its documents begin), kept from first
    lo = session.lo if source.plan.packing is not None else first
    items = _from(region_items(source.encode, source.corpus, source.plan, session.region, lo, hi,
                               row_documents), first, plan.prompt_lengths, row_documents)
    row_bytes = plan.bytes_per_token
    long = stream_tokens(opts, row_bytes)
    for unit in plan_units(opts, plan.prompt_lengths, row_bytes, plan.prompt_chunk, items):
        unit_lo = min(p for batch in unit for p, _ in batch)
        if unit_lo < first:
            continue
        if unit_lo >= hi:
            break
        for batch in unit:
            for captured in runner.run(batch, sink.put if streams(batch, long) else None):
                sink.put(captured)
            reporter.advance(len(batch), sum(len(t) for _, t in batch), writer.bytes_written)
        sink.put(UnitEnd(max(p for batch in unit for p, _ in batch) + 1, runner.retries))


def _from(items, first: int, lengths, row_documents: dict | None):
    """Stand-ins (``range(length)``) for the prompts before ``first``, read only to reach it."""
    for index, tokens in items:
        if index < first and not isinstance(tokens, range):
            if row_documents is not None:
                row_documents.pop(index, None)
            tokens = range(int(lengths[index]))
        yield index, tokens


def _capture(opts: ExtractOptions, model: LoadedModel, plan: Plan) -> Capture:
    rows = block_rows(plan)
    attention = (AttentionCapture(plan.matrices, mode=opts.attn_mode, method=opts.attn_method,
                                  precision=opts.attn_precision, rows=rows)
                 if plan.matrices else None)
    if plan.contributions:
        l_max = int(plan.prompt_lengths.max()) if plan.n_prompts else 0
        attention = ContributionCapture(plan.contributions, model.bridge, precision=opts.attn_precision,
                                        rows=rows, l_max=l_max)
    on_device = opts.stats and stats_on_device(model.device)
    states = plan.states
    state_specs = [a.hook for a in states.arrays] if states is not None else []
    return Capture(model.bridge, plan.hooks, plan.storage_dtype, model.device, attention,
                   stats=for_arrays(plan.arrays) if on_device else None,
                   states=StateCapture(state_specs, states.stride, opts.stats) if state_specs else None,
                   state_dtype=states.dtype if states is not None else STATE_DTYPE,
                   softmax=softmax_path(plan.hooks, plan.layer_products), matrix_rows=rows)


def _pad_id(tokenizer) -> int:
    return 0 if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def _flush_on_signal(sink: BatchSink, writer: RowWriter, recorder: ProgressRecorder) -> None:
    """On SIGINT / SIGTERM: write what was captured, record the last whole unit, leave resumable."""
    try:
        sink.close(strict=False)
        unit_end, stats, tally = sink.last_unit_end, sink.unit_stats, sink.unit_tally
        writer.checkpoint(lambda: recorder.record(unit_end, stats, tally))
        writer.close()
    except BaseException:  # the signal's exit code matters more than a second failure
        sink.abort()
        writer.abort()


def stats_on_device(device) -> bool:
    """Reduce the statistics where the rows are on a GPU (a few small kernels per hook) rather than
    on one host core (about 0.6 GB/s, below a GPU run's write rate)."""
    return device.type == "cuda"


def run_provenance(opts: ExtractOptions, model: LoadedModel, plan: Plan, source: Corpus,
                   split: WorkSplit, inputs: InputPlan) -> dict:
    """The group attribute ``gdn_dump`` a new store starts with (DESIGN.md section 4)."""
    return {
        **provenance_base(opts.command_line),
        "model": model.info,
        "hooks": [h.name for h in plan.hooks],
        "layers": sorted({h.layer for h in plan.hooks if h.layer is not None}),
        "storage_dtype": plan.storage_dtype,
        # sdpa: no L x L scores (no pattern stored); bridge: TransformerLens's explicit softmax
        "softmax_attention": softmax_path(plan.hooks, plan.layer_products),
        "compressor": opts.compressor,
        "writer": opts.writer,
        "prompts": {"path": str(source.display), "sha256": source.sha256, "count": plan.n_prompts,
                    "documents": source.count, "files": source.provenance(),
                    "format": source.format, "input": fields(opts).mode,
                    "text_field": opts.text_field, "id_field": opts.id_field,
                    "messages_field": opts.messages_field if opts.chat else None,
                    "add_generation_prompt": opts.add_generation_prompt if opts.chat else None,
                    "tokens_field": opts.tokens_field,
                    "encoding_errors": opts.encoding_errors, "replaced_lines": source.replaced_lines},
        "max_tokens": opts.max_tokens,
        "budget_cut_tokens": inputs.budget_tokens,
        "packing": inputs.packing.provenance() if inputs.packing is not None else None,
        "max_length": opts.max_length,
        "on_long": opts.on_long,
        "truncated": plan.truncated,
        "skipped_long": plan.skipped,
        "fail_on_nonfinite": opts.fail_on_nonfinite,
        "n_rows": plan.n_rows,
        "batch_size": opts.batch_size,
        "attention": {"layers": [a.layer for a in plan.matrices],
                      "heads": {str(a.layer): list(a.heads) for a in plan.matrices},
                      "mode": opts.attn_mode,
                      "method": opts.attn_method, "precision": opts.attn_precision}
        if plan.matrices else None,
        "contributions": contribution_provenance(opts, plan),
        "max_batch_tokens": opts.max_batch_tokens,
        "sort_window_bytes": opts.sort_window_bytes,
        "states": state_provenance(plan),
        "processes": {"count": split.count, "launcher": split.launcher,
                      "regions": [list(r) for r in plan.regions]},
    }


def contribution_provenance(opts: ExtractOptions, plan: Plan) -> dict | None:
    """What ``gdn-dump contributions`` stored (DESIGN.md section 4); None for other runs."""
    if not plan.contributions:
        return None
    first = plan.contributions[0]
    return {"layers": [c.layer for c in plan.contributions],
            "heads": {str(c.layer): list(c.heads) for c in plan.contributions},
            "logits": first.logits, "vectors": first.vectors, "precision": opts.attn_precision}
