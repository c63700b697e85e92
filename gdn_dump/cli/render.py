"""Rich output for the CLI: the progress bar while running and the tables printed after."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..run.pipeline import ExtractResult, Reporter
from ..store.layout import Plan, format_bytes


class RichReporter(Reporter):
    """Prompts, tokens, tokens/s and MB/s written, on stderr so stdout stays clean for pipes."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]extract"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} prompts"),
            TextColumn("{task.fields[tokens]} tokens"),
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

    def start(self, n_prompts: int, n_tokens: int) -> None:
        self.started = time.perf_counter()
        self.progress.start()
        self.task = self.progress.add_task("extract", total=n_prompts, tokens=0, rate="-", mbps="-")

    def advance(self, prompts: int, tokens: int, bytes_written: int) -> None:
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, advance=prompts, tokens=self.tokens,
                             rate=f"{self.tokens / elapsed:,.0f}",
                             mbps=f"{bytes_written / elapsed / 1e6:,.1f}")

    def note(self, message: str) -> None:
        self.console.print(message)

    def finish(self) -> None:
        self.progress.stop()


def plan_table(plan: Plan, title: str = "plan") -> Table:
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
                     + (f" (attention matrices: {format_bytes(plan.matrix_bytes)}, only tiles on or "
                        "below the diagonal written)" if plan.matrix_bytes else "")
                     + (f", {plan.truncated} prompts truncated to {plan.max_length} tokens"
                        if plan.truncated else "")
                     + (f", {plan.skipped} prompts over {plan.max_length} tokens skipped"
                        if plan.skipped else ""))
    return table


def summary_table(result: ExtractResult) -> Table:
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
        table.add_row(f"{name} ||MV-o||/||o||", f"max {worst:.1e}, mean {total / max(n, 1):.1e}")
    return table
