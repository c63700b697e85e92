"""One store from one or many processes: create or join it, resume, record progress, survive signals.

Process 0 creates the store (arrays, prompt index, provenance) and marks it ready in the ledger
(:mod:`gdn_dump.store.ledger`); under torchrun the others pass a barrier, independent ``--shard``
tasks poll for the marker. Each process then works on its own region from where its record says,
and records its progress there (:class:`ProgressRecorder`).

What to do with ``--out`` is decided once, by :func:`decide`, before any weights load.
"""

from __future__ import annotations

import contextlib
import enum
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass

import zarr

from ..errors import StoreError, Terminated
from ..ops.stats import ArrayStats, for_arrays, from_json, to_json
from ..store.create import ATTR, COMPLETE, check_out, create_store, open_group
from ..store.layout import Plan
from ..store.states import STATE_FINAL
from ..store.ledger import differences, mark_ready, read_record, ready_info, wait_ready, write_record
from ..store.location import Location, locate
from ..store.tally import Tally
from .plan import stream_tokens
from .split import Barrier, WorkSplit, run_id


class Start(enum.Enum):
    CREATE = "create"  # process 0: a new store (the place was checked)
    RESUME = "resume"  # process 0 with --resume: the store is there, continue it
    JOIN = "join"  # any other process: wait for process 0's store


def decide(opts, split: WorkSplit) -> tuple[Start, Location]:
    """What this process does with ``--out``, decided once. Creating checks the place now
    (exists without ``--overwrite``, a file, not writable, not ours), before weights load."""
    loc = locate(opts.out)
    if not split.creator:
        return Start.JOIN, loc
    if opts.resume and loc.has_group():
        return Start.RESUME, loc
    if not opts.dry_run:
        check_out(loc, overwrite=opts.overwrite)
    return Start.CREATE, loc


@dataclass
class Session:
    """This process's view of the run: the store, its region, and where to start in it."""

    group: zarr.Group
    location: Location
    region: int
    lo: int  # prompts [lo, hi) of the region
    hi: int
    resume_from: int  # first prompt to compute
    record: dict | None = None  # the region's progress record, if it has one
    region_done: bool = False
    store_complete: bool = False

    def resumed_stats(self, plan: Plan) -> dict[str, ArrayStats] | None:
        """The statistics of the rows before ``resume_from``: None (fresh) at the region's start,
        else those of the record; ``{}`` (none for this region) for a record without them."""
        if self.resume_from <= self.lo:
            return None
        state = (self.record or {}).get("stats")
        if not state or set(state) != set(for_arrays(plan.arrays)):
            return {}
        return from_json(state)

    def resumed_tally(self) -> Tally:
        """What the rows before ``resume_from`` took (the record's tally), or nothing."""
        if self.resume_from <= self.lo:
            return Tally()
        return Tally.from_json((self.record or {}).get("tally"))


def fingerprint(opts, plan: Plan, source, split: WorkSplit, model_dtype: str, inputs=None) -> dict:
    """What must be equal for processes to share a store, or for a run to resume it."""
    return {
        "model": opts.model, "revision": opts.revision, "model_dtype": model_dtype,
        "hooks": [h.name for h in plan.hooks],
        "attention": [[a.layer, list(a.heads)] for a in plan.matrices],
        # only when there are some: a store written before contributions existed still resumes
        **({"contributions": [[c.layer, list(c.heads), c.logits, c.vectors] for c in plan.contributions]}
           if plan.contributions else {}),
        "attn_mode": opts.attn_mode, "attn_method": opts.attn_method,
        "attn_precision": opts.attn_precision,
        "storage_dtype": plan.storage_dtype, "compressor": opts.compressor,
        "prompts_sha256": source.sha256, "prompts": plan.n_prompts, "documents": source.count,
        "text_field": opts.text_field, "id_field": opts.id_field, "chat": opts.chat,
        "messages_field": opts.messages_field, "tokens_field": opts.tokens_field,
        "add_generation_prompt": opts.add_generation_prompt, "context_size": opts.context_size,
        "max_tokens": opts.max_tokens,
        "packing": inputs.packing.provenance() if inputs is not None and inputs.packing else None,
        "encoding_errors": opts.encoding_errors, "max_length": opts.max_length,
        "on_long": opts.on_long,
        "chunks": {a.name: [list(a.chunks), list(a.shards) if a.shards else None] for a in plan.arrays},
        "batch_size": opts.batch_size, "max_batch_tokens": opts.max_batch_tokens,
        "sort_window_bytes": opts.sort_window_bytes,
        # prompts this long are units of their own (they stream): part of how units are cut
        "stream_tokens": stream_tokens(opts, plan.bytes_per_token),
        "states": state_provenance(plan),
        "processes": split.count,
    }


def state_provenance(plan: Plan) -> dict | None:
    """What the state snapshots are: the stride (``final``: the last token only), the dtype and
    how many; None without states."""
    states = plan.states
    if states is None:
        return None
    return {"every": states.stride if states.stride is not None else STATE_FINAL,
            "dtype": states.dtype, "n_snapshots": states.n_states,
            "layers": [a.hook.layer for a in states.arrays]}


def open_session(opts, start: Start, loc: Location, plan: Plan, prompt_ids, split: WorkSplit,
                 fp: dict, provenance: dict, barrier: Barrier, resumed: zarr.Group | None = None,
                 on_open=None) -> Session:
    """Create, resume or join the store as :func:`decide` said; return where this process starts.
    ``resumed``: what :func:`resumable` found (to resume; None: create it again).
    ``on_open(out)`` is called as soon as the store exists for this process."""
    launch = run_id()
    on_open = on_open or (lambda out: None)
    if start is Start.JOIN:
        barrier.wait()
        group = wait_ready(lambda: open_group(loc, mode="r+"), fp, launch, opts.wait_timeout,
                           opts.resume)
        on_open(opts.out)
    else:
        group = resumed if start is Start.RESUME else None
        if group is None:
            group = create_store(loc if start is Start.CREATE else check_out(loc, overwrite=True),
                                 plan, provenance, compressor=opts.compressor,
                                 prompt_ids=prompt_ids)
            on_open(opts.out)
            mark_ready(group, fp, plan.regions, launch)
            fault("after-create")
        else:
            on_open(opts.out)
        barrier.wait()
    lo, hi = plan.regions[split.index]
    session = Session(group, loc, split.index, lo, hi, lo,
                      store_complete=group.attrs[ATTR].get("status") == COMPLETE)
    record = read_record(group, split.index)
    if record is not None:
        if not opts.resume:
            raise StoreError(f"region {split.index} of {opts.out} already has progress "
                             f"(up to prompt {record.get('resume_from')}); pass --resume to continue "
                             "it, or --overwrite on process 0 to start over")
        session.record = record
        session.resume_from = int(record.get("resume_from", lo))
        session.region_done = bool(record.get("done"))
    return session


def resumable(opts, loc: Location, fp: dict) -> zarr.Group | None:
    """For ``--resume`` (:data:`Start.RESUME`), checked before the weights load: the store to
    continue, refused in one line if it was written with other settings; None when it was never
    marked ready (killed while being created: nothing in it can be trusted, so it is created
    again)."""
    group = open_group(loc, mode="r+")
    info = ready_info(group)
    if info is None:
        return None
    diff = differences(info.get("fingerprint", {}), fp)
    if diff:
        raise StoreError(f"--resume: {opts.out} was written with different settings; "
                         f"{'; '.join(diff[:8])}")
    return group


class ProgressRecorder:
    """Writes this process's progress record; called on the writer thread once every row before
    the recorded prompt is written (see :meth:`gdn_dump.store.writer.RowWriter.checkpoint`)."""

    def __init__(self, session: Session, plan: Plan):
        self.session, self.plan = session, plan
        self.checkpoints = 0

    def record(self, resume_from: int, stats: dict[str, ArrayStats] | None, tally: Tally,
               done: bool = False) -> None:
        session = self.session
        # chunk files are written without fsync: make them durable before claiming them
        session.location.sync()
        write_record(session.group, session.region, {
            "prompts": [session.lo, session.hi], "rows": list(self.plan.region_rows(session.region)),
            "states": list(self.plan.region_states(session.region)),
            "resume_from": resume_from, "done": done,
            "tokens": int(self.plan.prompt_lengths[session.lo:resume_from].sum()),
            "tally": tally.to_json(), "peak_rss": peak_rss(),
            "stats": to_json(stats) if stats is not None else None,
        })
        self.checkpoints += 1
        fault(f"after-checkpoint:{self.checkpoints}")


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Clock:
    """Seconds spent on a region over every run: the resumed record's, plus this run's."""

    def __init__(self, before: float = 0.0):
        self.before, self.started = before, time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started


@contextlib.contextmanager
def signals_as_exceptions():
    """SIGTERM (Slurm preemption, ``kill``) raises :class:`Terminated` in the main thread, the
    way SIGINT raises KeyboardInterrupt, so both unwind through the same flush-and-record path."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fault(point: str) -> None:
    """Test hook: ``GDN_DUMP_FAULT=<point>`` kills this process with SIGKILL at ``point``
    (``after-create``, ``after-checkpoint:N``, ``before-finalize``), the way a node failure would."""
    if os.environ.get("GDN_DUMP_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
