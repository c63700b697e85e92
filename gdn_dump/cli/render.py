"""Everything the CLI prints but its help (:mod:`.help`): the one-line errors, the progress bar, and the tables.

No torch: the inspect, verify and plot commands run on the base install, so nothing here imports
``gdn_dump.run.pipeline``; :class:`RichReporter` has the methods of its ``Reporter``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..catalogue import CONTRIBUTION_NORM
from ..errors import GdnDumpError, Terminated
from ..ops.stats import histogram_median
from ..run.result import Reporter
from ..store.layout import format_bytes

def console(stderr: bool = False) -> Console:
    """A console per call (so COLUMNS is read when the command runs); wide when not a terminal."""
    out = Console(stderr=stderr)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out.width = 160
    return out


# --- errors ------------------------------------------------------------------------------------------

def error_line(exc: BaseException) -> tuple[str, int]:
    """The one line (without the ``gdn-dump: error:`` prefix) and the exit code of an error."""
    from .options import click_errors

    if isinstance(exc, click_errors.UsageError):
        where = f"; see {exc.ctx.command_path} --help" if getattr(exc, "ctx", None) else ""
        return " ".join(exc.format_message().split()).rstrip(".") + where, 2
    text = str(exc).strip()
    message = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, GdnDumpError):
        return message, exc.exit_code
    return f"{type(exc).__name__}: {message} (rerun with --debug for the traceback)", 1


def interrupted(code: int, run=None) -> str:
    """What a Ctrl-C (130) or SIGTERM (143) leaves behind, for the run whose reporter is ``run``
    (it knows whether the store was opened: the library says so, nothing is checked again)."""
    what = "terminated" if code == 143 else "interrupted"
    if run is None:
        return f"gdn-dump: {what}"
    if run.store is None:
        return f"gdn-dump: {what} before the store was created; nothing was written"
    return (f"gdn-dump: {what}; what was captured is written and {run.store} stays in_progress: "
            "rerun with --resume to continue")


def report_error(exc: BaseException, run=None) -> int:
    """Print ``exc`` as one line on stderr; return its exit code."""
    err = console(stderr=True)
    if isinstance(exc, (KeyboardInterrupt, Terminated)):
        code = getattr(exc, "exit_code", 130)
        err.print(interrupted(code, run), highlight=False, soft_wrap=True, markup=False)
        return code
    message, code = error_line(exc)
    err.print(f"[red]gdn-dump: error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return code


# --- extract and attn-matrix ----------------------------------------------------------------------

@contextlib.contextmanager
def quiet_libraries(quiet: bool):
    """``--quiet``: the libraries' own progress bars (transformers' "Loading weights",
    huggingface_hub's downloads) off too, for the run only; as they were afterwards."""
    if not quiet:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_was_on, transformers_was_on = not are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hub_was_on:
            enable_progress_bars()
        if transformers_was_on:
            hf_logging.enable_progress_bar()


class RichReporter(Reporter):
    """The ``Reporter`` of :func:`gdn_dump.run.pipeline.extract`: prompts, tokens, tokens/s and MB/s
    written, on stderr so stdout stays clean for pipes (nothing with ``show=False``: ``--quiet``).
    It also remembers whether the store was opened, for the message of an interruption."""

    def __init__(self, console: Console, show: bool = True):
        self.console, self.show = console, show
        self.store: str | None = None
        self.progress = Progress(
            TextColumn("[bold]extract"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} prompts"),
            TextColumn("{task.fields[tokens]}/{task.fields[total_tokens]} tokens"),
            TextColumn("{task.fields[rate]} tok/s"),
            TextColumn("{task.fields[mbps]} MB/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = None
        self.tokens = 0
        self.started = 0.0

    def opened(self, out: str) -> None:
        self.store = out

    def start(self, n_prompts: int, n_tokens: int) -> None:
        self.started = time.perf_counter()
        if not self.show:
            return
        self.progress.start()
        self.task = self.progress.add_task("extract", total=n_prompts, tokens="0",
                                           total_tokens=f"{n_tokens:,}", rate="-", mbps="-")

    def advance(self, prompts: int, tokens: int, bytes_written: int) -> None:
        if not self.show:
            return
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, advance=prompts, tokens=f"{self.tokens:,}",
                             rate=f"{self.tokens / elapsed:,.0f}",
                             mbps=f"{bytes_written / elapsed / 1e6:,.1f}")

    def note(self, message: str) -> None:
        if self.show:
            self.console.print(message)

    def finish(self) -> None:
        if self.show:
            self.progress.stop()


def plan_table(plan, title: str = "plan") -> Table:
    table = Table(title=title)
    for column in ("array", "shape", "dtype", "chunks", "dims", "bytes"):
        table.add_column(column, justify="right" if column == "bytes" else "left",
                         overflow="fold")
    for spec in plan.arrays:
        size = format_bytes(spec.nbytes) if spec.stream else f"<= {format_bytes(spec.nbytes)}"
        table.add_row(spec.name, str(spec.shape), spec.dtype, str(spec.chunks),
                      ",".join(spec.dims), size)
    table.caption = (f"{plan.n_prompts} prompts, {plan.n_rows} token rows, "
                     f"{len(plan.arrays)} arrays, {format_bytes(plan.total_bytes)} uncompressed"
                     + (f" (matrices: {format_bytes(plan.matrix_bytes)}, only tiles on or "
                        "below the diagonal written)" if plan.matrix_bytes else "")
                     + (f", {plan.truncated} prompts truncated to {plan.max_length} tokens"
                        if plan.truncated else "")
                     + (f", {plan.skipped} prompts over {plan.max_length} tokens skipped"
                        if plan.skipped else ""))
    return table


def memory_table(estimates) -> Table:
    """The dry run's memory estimate per prompt length (gdn_dump.run.memory)."""
    from ..run.memory import RUN_OVERHEAD
    device = estimates[0].device
    table = Table(title=f"memory for one prompt (estimate; device {device})")
    for column in ("prompt tokens", "weights", "forward", "matrices", "rows (host)",
                   "device" if device != "cpu" else "total"):
        table.add_column(column, justify="right")
    for e in estimates:
        rows = format_bytes(e.rows) + (" streamed" if e.streams else "")
        last = e.device_bytes if device != "cpu" else e.host_bytes
        table.add_row(f"{e.tokens:,}", format_bytes(e.weights), format_bytes(e.forward),
                      format_bytes(e.matrices), rows, format_bytes(last))
    table.caption = ("forward: the widest layer's activations; rows: the prompt's rows waiting for "
                     "the writer (a prompt that fills --sort-window streams them in pieces); host "
                     f"totals include {format_bytes(RUN_OVERHEAD)} for the run itself")
    return table


def summary_table(result) -> Table:
    table = Table(title=f"wrote {result.out}")
    table.add_column("what")
    table.add_column("value", justify="right")
    rate = result.tokens / result.seconds if result.seconds else 0.0
    mbps = result.bytes_written / result.seconds / 1e6 if result.seconds else 0.0
    for what, value in (
        ("prompts", f"{result.prompts:,}"),
        ("token rows", f"{result.tokens:,}"),
        ("arrays", str(len(result.plan.arrays))),
        ("bytes written", format_bytes(result.bytes_written)),
        ("time", f"{result.seconds:.2f} s"),
        ("tokens/s", f"{rate:,.0f}"),
        ("MB/s written", f"{mbps:,.1f}"),
        ("truncated prompts", str(result.plan.truncated)),
        *([("skipped prompts (over --max-length)", str(result.plan.skipped))] if result.plan.skipped else []),
        *([("lines with invalid UTF-8 (replaced)", str(result.replaced_lines))] if result.replaced_lines else []),
        *([("out-of-memory retries", str(result.oom_retries))] if result.oom_retries else []),
        ("padding in batches", f"{result.padding:.1%}"),
        ("rows held for reordering (peak)", format_bytes(result.peak_held_bytes)),
        ("peak resident memory", format_bytes(result.peak_rss)),
    ):
        table.add_row(what, value)
    for name, count in result.nonfinite.items():
        table.add_row(f"[red]NaN/inf in {name}", f"{count:,} values")
    for name, count in result.overflow.items():
        table.add_row(f"[red]overflow in {name}", f"{count:,} values")
    for name, (worst, total, n) in sorted(result.residuals.items()):
        check = "max_i ||sum c - out||/||out||" if name.endswith(CONTRIBUTION_NORM) else "||MV-o||/||o||"
        table.add_row(f"{name} {check}", f"max {worst:.1e}, mean {total / max(n, 1):.1e}")
    return table


def report_run(opts, result, *, quiet: bool, heatmaps: list | None = None, png=None) -> None:
    """After a run: the plan (dry run), the warnings, the other regions still running, the summary."""
    if opts.dry_run:
        console().print(plan_table(result.plan, title=f"plan for {opts.out} (dry run: nothing written)"))
        if result.memory:
            console().print(memory_table(result.memory))
        return
    err = console(stderr=True)
    for name, count in result.nonfinite.items():
        err.print(f"[yellow]warning:[/] {count:,} NaN/inf values in {name} (from the model, stored "
                  "as they are); --fail-on-nonfinite stops at the first")
    for name, count in result.overflow.items():
        err.print(f"[yellow]warning:[/] {count:,} values of {name} overflowed to inf when cast to "
                  f"{result.plan.storage_dtype}; use --dtype float32")
    if result.pending_regions:
        err.print(f"region {result.split.index} of {result.split.count} is done; "
                  f"{len(result.pending_regions)} region(s) still running: the last process to "
                  "finish marks the store complete (or run gdn-dump finalize)")
    if not quiet:
        err.print(summary_table(result))
        if heatmaps:
            err.print(f"{len(heatmaps)} heatmaps in {png}")


# --- hooks, inspect, verify, plot, finalize -----------------------------------------------------

def hooks_table(model: str, catalogue, short_names) -> Table:
    table = Table(title=f"hooks of {model} (short GDN names: {', '.join(short_names)})")
    # "per-token shape": per snapshot for kind "state" (rows along the state axis)
    for column in ("hook", "short", "layer", "layer type", "per-token shape", "dims", "kind"):
        table.add_column(column, overflow="fold")
    for spec in catalogue:
        table.add_row(spec.name, spec.short or "", "" if spec.layer is None else str(spec.layer),
                      spec.layer_type, str(list(spec.shape)), ",".join(spec.dims), spec.kind)
    return table


def _number(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def stats_rows(group) -> list[dict]:
    """One row per array of a store that carries ``stats``: what ``gdn-dump inspect`` prints."""
    rows = []
    for name, arr in sorted(group.arrays()):
        attrs = dict(arr.attrs)
        if attrs.get("stats"):
            rows.append(_stats_row(name, attrs["stats"]))
        for statistic, s in sorted((attrs.get("state_stats") or {}).items()):
            rows.append(_stats_row(f"{name} {statistic}", s))  # per head, over the snapshots
    return rows


def _stats_row(name: str, s: dict) -> dict:
    def avg(key):
        values = [x for x in s.get(key, []) if x is not None]
        return sum(values) / len(values) if values else None

    mins = [x for x in s.get("min", []) if x is not None]
    maxs = [x for x in s.get("max", []) if x is not None]
    row = {"name": name, "heads": len(s["count"]), "heads_dim": s.get("heads_dim"),
           "count": int(sum(s["count"])), "nonfinite": int(sum(s.get("nonfinite", []))),
           "mean": avg("mean"), "std": avg("std"), "mean_l2": avg("mean_l2"),
           "min": min(mins) if mins else None, "max": max(maxs) if maxs else None}
    if "half_life_histogram" in s:
        row["median_half_life"] = histogram_median(s["half_life_histogram"])
    return row


def input_lines(meta: dict[str, Any]) -> list[str]:
    """What the store was made from, in a few lines (a corpus of many files stays short)."""
    prompts = dict(meta.get("prompts") or {})
    files = prompts.pop("files", None) or []
    lines = [f"prompts: {json.dumps(prompts)}"]
    if files:
        shown = ", ".join(f"{f['path']} ({f['records']:,} records, {format_bytes(f['size'])})"
                          for f in files[:3])
        more = f", ... ({len(files) - 3} more)" if len(files) > 3 else ""
        lines.append(f"files: {len(files)}: {shown}{more}")
    packing = meta.get("packing")
    if packing:
        lines.append(f"packing: {json.dumps(packing)}")
    if meta.get("max_tokens") is not None:
        lines.append(f"budget: --max-tokens {meta['max_tokens']:,}")
    return lines


def print_inspect(name: str, meta: dict[str, Any], rows: list[dict], stats_rows: list[dict]) -> None:
    """``gdn-dump inspect``: the arrays, the provenance, the per-head statistics."""
    out = console()
    table = Table(title=f"{name}  [status: {meta.get('status')}]")
    for column in ("array", "shape", "dtype", "chunks", "dims", "on disk"):
        table.add_column(column, justify="right" if column == "on disk" else "left",
                         overflow="fold")
    for row in rows:
        table.add_row(row["name"], str(row["shape"]), row["dtype"], str(row["chunks"]),
                      ",".join(row["dims"]), format_bytes(row["stored_bytes"]))
    table.caption = f"{sum(r['stored_bytes'] for r in rows):,} bytes on disk"
    out.print(table)
    model = meta.get("model", {})
    out.print(f"status: {meta.get('status')}")
    out.print(f"model: {model.get('name')} ({model.get('dtype')}, {model.get('device')}, "
              f"kernels: {model.get('kernel_backend')})")
    for line in input_lines(meta):
        out.print(line)
    out.print(f"storage dtype: {meta.get('storage_dtype')}, max length: {meta.get('max_length')}, "
              f"truncated: {meta.get('truncated')}, skipped: {meta.get('skipped_long', 0)}")
    for key, what in (("nonfinite", "NaN/inf values"), ("overflow", "float16 overflow")):
        for array, count in (meta.get(key) or {}).items():
            out.print(f"[red]{what} in {array}: {count:,}[/]")
    out.print(f"created: {meta.get('created')}, command: {' '.join(meta.get('command_line', []))}")
    if not stats_rows:
        return
    stats = Table(title="statistics (over heads: mean of the per-head means, stds, L2 norms)")
    for column in ("array", "heads", "count", "mean", "std", "mean L2", "min", "max"):
        stats.add_column(column, justify="left" if column == "array" else "right", overflow="fold")
    for r in stats_rows:
        stats.add_row(r["name"], f"{r['heads']} {r['heads_dim'] or ''}".strip(),
                      f"{r['count']:,}" + (f" (+{r['nonfinite']:,} NaN/inf)" if r["nonfinite"] else ""),
                      _number(r["mean"]), _number(r["std"]), _number(r["mean_l2"]),
                      _number(r["min"]), _number(r["max"]))
    out.print(stats)
    for r in stats_rows:
        if "median_half_life" in r:
            out.print(f"median half-life (tokens) per head, {r['name']}: "
                      + " ".join(_number(x) for x in r["median_half_life"]))


def verify_table(checks) -> Table:
    """``gdn-dump verify``: a row per check of :func:`gdn_dump.store.verify.verify_store`."""
    table = Table("check", "ok", "detail")
    for c in checks:
        table.add_row(c.name, "[green]ok[/]" if c.ok else "[red]FAIL[/]", c.detail)
    return table


def print_plot(name: str, opened, path) -> None:
    """``gdn-dump plot``: what was written, and a warning if the store is not complete."""
    err = console(stderr=True)
    if opened.status != "complete":
        err.print(f"[yellow]warning:[/] {name} is {opened.status}: only its {len(opened.visible)} "
                  f"finished prompts (of {opened.n_prompts}) are shown", highlight=False)
    err.print(f"wrote {path}", highlight=False)


@contextlib.contextmanager
def export_progress(out: Console, show: bool = True):
    """A callback ``(done, total)`` drawing a progress bar of the contexts written (twice each
    when shuffled: to their place, then into the cache). The bar appears with the first report,
    after every check: a refusal stays one line."""
    if not show:
        yield None
        return
    progress = Progress(TextColumn("[bold]export"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=out)
    task = None

    def report(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task("export", total=total)
        progress.update(task, completed=done, total=total)

    try:
        yield report
    finally:
        if task is not None:
            progress.stop()


def export_table(done) -> Table:
    """What ``gdn-dump export`` wrote: one row per hook."""
    table = Table(title="exported")
    for column in ("hook", "directory", "contexts", "context size", "d_in", "dropped rows", "bytes"):
        table.add_column(column, justify="left" if column in ("hook", "directory") else "right")
    for e in done:
        table.add_row(e.hook, str(e.path), f"{e.contexts:,}", str(e.context_size), str(e.d_in),
                      f"{e.dropped_rows:,}", format_bytes(e.bytes))
    return table
