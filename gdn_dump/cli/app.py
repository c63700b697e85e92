"""The ``gdn-dump`` command line: parse options, call the library, report. Nothing else."""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import GdnDumpError, Terminated

try:  # typer >= 0.2x carries its own copy of click
    from typer._click import exceptions as _click_errors
except ImportError:
    from click import exceptions as _click_errors

app = typer.Typer(help="Stream Gated DeltaNet internals of Qwen3.5 / Qwen3-Next models into Zarr.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def _console(stderr: bool = False) -> Console:
    """A console per call (so COLUMNS is read when the command runs); wide when not a terminal."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 160
    return console


def _load_config(ctx: click.Context, param: click.Parameter, value: Optional[Path]):
    """``--config FILE.toml``: its keys are option names; options given on the command line win."""
    if value is None:
        return value
    try:
        data = tomllib.loads(Path(value).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        _fail(GdnDumpError(f"--config {value}: cannot read it ({exc})"), False)
    known = {p.name for p in ctx.command.params}
    defaults = {}
    for key, item in data.items():
        name = key.replace("-", "_")
        if name not in known or name == "config":
            _fail(GdnDumpError(f"--config {value}: unknown key {key!r}; keys are option names"), False)
        defaults[name] = ",".join(map(str, item)) if isinstance(item, list) else item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _fail(exc: BaseException, debug: bool) -> None:
    if debug:
        raise exc
    code = getattr(exc, "exit_code", 1)
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not isinstance(exc, GdnDumpError):
        message = f"{type(exc).__name__}: {message} (rerun with --debug for the traceback)"
    _console(stderr=True).print(f"[red]gdn-dump: error:[/] {escape(message)}", highlight=False,
                                soft_wrap=True)
    raise typer.Exit(code)


def _size(text: str) -> int:
    """``16GiB``, ``500MB``, ``1e9`` -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20,
             "g": 2**30, "t": 2**40}
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtib")
    try:
        return int(float(number) * units[raw[len(number):]])
    except (KeyError, ValueError):
        raise GdnDumpError(f"cannot read the size {text!r}; use e.g. 16GiB, 500MB or 1000000") from None


# Options shared by extract and attn-matrix (Typer has no option groups: one definition, two uses).
ModelOpt = typer.Option(..., "--model", "-m", help="'tiny', a Hugging Face id or a local checkpoint directory.")
PromptsOpt = typer.Option(..., "--prompts", "-p", help="Prompt file: .txt (a prompt per line), .jsonl, or - for stdin.")
OutOpt = typer.Option(..., "--out", "-o", help="The Zarr store to write.")
RevisionOpt = typer.Option(None, help="Model revision (branch, tag or commit).")
DeviceOpt = typer.Option("auto", help="auto, cuda[:N] or cpu.")
ModelDtypeOpt = typer.Option(None, help="Model dtype: float32, float16 or bfloat16 (default bfloat16 on CUDA, float32 on CPU).")
RemoteCodeOpt = typer.Option(False, help="Allow the checkpoint's own Python code to run.")
PickleOpt = typer.Option(False, help="Allow non-safetensors (pickle) weight files.")
KernelsOpt = typer.Option("auto", help="GDN kernels: auto (fla on CUDA when installed, else torch), torch, fla.")
TextFieldOpt = typer.Option("text", help="jsonl field that holds the prompt.")
MaxLengthOpt = typer.Option(None, help="Longest prompt in tokens; longer ones are handled by --on-long (counted and recorded).")
OnLongOpt = typer.Option("truncate", help="A prompt over --max-length: truncate it, skip it (stored with no tokens), or error (before anything is written).")
EncodingErrorsOpt = typer.Option("strict", help="Invalid UTF-8 in the prompt file: strict (stop, naming the line) or replace (U+FFFD; lines counted and recorded).")
StatsOpt = typer.Option(True, "--stats/--no-stats", help="Per-head statistics (count, mean, std, mean L2, min, max; half-life and beta histograms) of every stored array, computed while writing (on the GPU when there is one; on the CPU about 0.6 GB/s of one core).")
FailNonfiniteOpt = typer.Option(False, help="Stop the run at the first batch with NaN/inf in a stored hook (they are always counted per array).")
MaxBatchTokensOpt = typer.Option(None, help="Most padded tokens per batch.")
ShardOpt = typer.Option(None, help="This process's share of the prompts, I/N (e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); under torchrun RANK/WORLD_SIZE are used without it.")
ResumeOpt = typer.Option(False, help="Continue the run recorded in --out (killed, preempted); start it if there is none. Refused if the settings differ.")
WaitTimeoutOpt = typer.Option(600.0, help="Seconds a process other than 0 waits for process 0 to create the store.")
CheckpointOpt = typer.Option(60.0, help="Seconds between progress records (what --resume starts from).")
SortWindowOpt = typer.Option("1GiB", help="Run prompts longest first within windows of this many bytes of rows (less padding; the store keeps file order; bounds the reorder memory). 0: file order.")
OverwriteOpt = typer.Option(False, help="Replace an existing gdn-dump store at --out (never anything else).")
DryRunOpt = typer.Option(False, help="Print the plan and exit without loading weights or writing anything.")
ForceOpt = typer.Option(False, help="Run even if the estimate exceeds the free disk space.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar or tables.")
ConfigOpt = typer.Option(None, help="TOML file of option values (keys = option names).", callback=_load_config, is_eager=True)
DebugOpt = typer.Option(False, "--debug", help="Show tracebacks.")
HeadsOpt = typer.Option(None, "--heads", help="Heads of each matrix layer: 'all' (default) or a list like 0,2,5-7.")
ModeOpt = typer.Option("exact", "--mode", help="exact (the GDN output decomposition) or heuristic (TransformerLens's formula).")
MethodOpt = typer.Option("chunked", "--method", help="Exact GDN matrix: chunked (identity-value chunk kernel, O(L^2 d_k)) or closed_form (triangular solve, O(L^3)).")
PrecisionOpt = typer.Option("float32", "--precision", help="Compute the GDN matrix in float32 or float64 (stored as float32).")
MaxBytesOpt = typer.Option("16GiB", "--max-bytes", help="Refuse a run whose attention matrices would exceed this (e.g. 16GiB).")


def _run(opts, *, quiet: bool, debug: bool, png: Optional[Path] = None, png_log: bool = False,
         png_max_prompts: int = 4) -> None:
    """Run the library's extract and report: the CLI commands differ only in their options."""
    from ..run.pipeline import extract as run_extract
    from .render import RichReporter, plan_table, summary_table

    err = _console(stderr=True)
    try:
        result = run_extract(opts, None if quiet else RichReporter(err))
        written = _draw(opts, result, png, png_log, png_max_prompts) if png and not opts.dry_run else []
    except (KeyboardInterrupt, Terminated) as exc:
        from ..store.create import has_store

        code = getattr(exc, "exit_code", 130)
        what = "terminated" if code == 143 else "interrupted"
        try:
            started = not opts.dry_run and has_store(opts.out)
        except Exception:  # an unreachable remote store: say what would be true if it was made
            started = True
        if not started:
            err.print(f"gdn-dump: {what} before the store was created; nothing was written")
        else:
            err.print(f"gdn-dump: {what}; what was captured is written and {opts.out} stays "
                      "in_progress: rerun with --resume to continue")
        raise typer.Exit(code) from None
    except Exception as exc:  # one line, never a traceback (unless --debug)
        _fail(exc, debug)
    if opts.dry_run:
        _console().print(plan_table(result.plan, title=f"plan for {opts.out} (dry run: nothing written)"))
        return
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
        if written:
            err.print(f"{len(written)} heatmaps in {png}")


def _draw(opts, result, png: Path, log_scale: bool, max_prompts: int) -> list:
    import zarr

    from ..read.plots import attention_heatmaps

    group = zarr.open_group(str(opts.out), mode="r")
    return attention_heatmaps(group, png, result.model.tokenizer, max_prompts=max_prompts,
                              log_scale=log_scale)


@app.command()
def extract(
    model: str = ModelOpt,
    prompts: str = PromptsOpt,
    out: str = OutOpt,
    hooks: Optional[str] = typer.Option(None, help="Short GDN hook names for every selected layer (or all, or default) and/or full TransformerLens hook names, comma separated. Default: q_pre_conv,k_pre_conv,v_pre_conv,q,k,v,beta,log_decay,recurrence_out."),
    layers: str = typer.Option("all", help="GDN layers for the short hook names: 'all', or indices and ranges like 0,1,4-6."),
    attn_layers: Optional[str] = typer.Option(None, help="Also store the attention matrix (blocks.<i>.attn_matrix) of these layers: 'all' or a list."),
    attn_heads: Optional[str] = HeadsOpt,
    attn_mode: str = ModeOpt,
    attn_method: str = MethodOpt,
    attn_precision: str = PrecisionOpt,
    max_bytes: str = MaxBytesOpt,
    revision: Optional[str] = RevisionOpt,
    device: str = DeviceOpt,
    model_dtype: Optional[str] = ModelDtypeOpt,
    trust_remote_code: bool = RemoteCodeOpt,
    allow_pickle_weights: bool = PickleOpt,
    kernels: str = KernelsOpt,
    text_field: str = TextFieldOpt,
    max_length: Optional[int] = MaxLengthOpt,
    on_long: str = OnLongOpt,
    encoding_errors: str = EncodingErrorsOpt,
    fail_on_nonfinite: bool = FailNonfiniteOpt,
    stats: bool = StatsOpt,
    batch_size: int = typer.Option(8, help="Prompts per batch."),
    max_batch_tokens: Optional[int] = MaxBatchTokensOpt,
    sort_window: str = SortWindowOpt,
    shard: Optional[str] = ShardOpt,
    resume: bool = ResumeOpt,
    wait_timeout: float = WaitTimeoutOpt,
    checkpoint_every: float = CheckpointOpt,
    dtype: str = typer.Option("float16", help="Storage dtype of vector hooks: float32, float16 or bfloat16 (per-head scalars stay float32)."),
    chunk_tokens: Optional[int] = typer.Option(None, help="Token rows per chunk (default: a few MB per chunk)."),
    shard_tokens: Optional[int] = typer.Option(None, help="Group chunks into shard files of about this many token rows (zarr's sharding codec); whole shards are written at once."),
    compressor: str = typer.Option("none", help="none, zstd or blosc."),
    writer: str = typer.Option("tensorstore", help="Chunk writer: tensorstore (TensorStore's zarr3 driver) or zarr (zarr-python); byte-identical stores."),
    overwrite: bool = OverwriteOpt,
    dry_run: bool = DryRunOpt,
    force: bool = ForceOpt,
    quiet: bool = QuietOpt,
    config: Optional[Path] = ConfigOpt,
    debug: bool = DebugOpt,
) -> None:
    """Run prefill over the prompts and stream the selected hooks into a Zarr store."""
    from ..run.options import ExtractOptions

    try:
        budget, window = _size(max_bytes), _size(sort_window)
    except GdnDumpError as exc:
        _fail(exc, debug)
    _run(ExtractOptions(
        model=model, prompts=prompts, out=out, hooks=hooks, layers=layers, revision=revision,
        device=device, model_dtype=model_dtype, trust_remote_code=trust_remote_code,
        allow_pickle_weights=allow_pickle_weights, kernels=kernels, text_field=text_field,
        max_length=max_length, on_long=on_long, encoding_errors=encoding_errors,
        fail_on_nonfinite=fail_on_nonfinite, stats=stats, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
        sort_window_bytes=window, shard=shard, resume=resume, wait_timeout=wait_timeout,
        checkpoint_every=checkpoint_every, dtype=dtype,
        chunk_tokens=chunk_tokens, shard_tokens=shard_tokens, compressor=compressor, writer=writer,
        overwrite=overwrite,
        dry_run=dry_run, force=force, attn_layers=attn_layers, attn_heads=attn_heads, attn_mode=attn_mode,
        attn_method=attn_method, attn_precision=attn_precision, max_attn_bytes=budget,
        command_line=["gdn-dump", *sys.argv[1:]],
    ), quiet=quiet, debug=debug)


@app.command("attn-matrix")
def attn_matrix(
    model: str = ModelOpt,
    prompts: str = PromptsOpt,
    out: str = OutOpt,
    layer: str = typer.Option("all", "--layer", "--layers", help="Layers: 'all' or indices and ranges like 3 or 0,4-6. GDN layers give the effective attention, softmax layers their hook_pattern."),
    heads: Optional[str] = HeadsOpt,
    mode: str = ModeOpt,
    method: str = MethodOpt,
    precision: str = PrecisionOpt,
    max_bytes: str = MaxBytesOpt,
    png: Optional[Path] = typer.Option(None, help="Write a heatmap per (prompt, layer, head) into this directory."),
    png_log: bool = typer.Option(False, help="Log colour scale (of |M|) for the heatmaps."),
    png_max_prompts: int = typer.Option(4, help="Heatmaps for this many prompts (the first ones)."),
    revision: Optional[str] = RevisionOpt,
    device: str = DeviceOpt,
    model_dtype: Optional[str] = ModelDtypeOpt,
    trust_remote_code: bool = RemoteCodeOpt,
    allow_pickle_weights: bool = PickleOpt,
    kernels: str = KernelsOpt,
    text_field: str = TextFieldOpt,
    max_length: Optional[int] = MaxLengthOpt,
    on_long: str = OnLongOpt,
    encoding_errors: str = EncodingErrorsOpt,
    fail_on_nonfinite: bool = FailNonfiniteOpt,
    stats: bool = StatsOpt,
    batch_size: int = typer.Option(1, help="Prompts per batch."),
    max_batch_tokens: Optional[int] = MaxBatchTokensOpt,
    sort_window: str = SortWindowOpt,
    shard: Optional[str] = ShardOpt,
    resume: bool = ResumeOpt,
    wait_timeout: float = WaitTimeoutOpt,
    checkpoint_every: float = CheckpointOpt,
    overwrite: bool = OverwriteOpt,
    dry_run: bool = DryRunOpt,
    force: bool = ForceOpt,
    quiet: bool = QuietOpt,
    config: Optional[Path] = ConfigOpt,
    debug: bool = DebugOpt,
) -> None:
    """Store attention matrices: the exact effective attention of GDN layers (M with o_i = sum_j
    M[i,j] v_j, checked against the layer's output on every prompt) and softmax patterns."""
    from ..run.options import ExtractOptions

    try:
        budget, window = _size(max_bytes), _size(sort_window)
    except GdnDumpError as exc:
        _fail(exc, debug)
    _run(ExtractOptions(
        model=model, prompts=prompts, out=out, hooks="", revision=revision, device=device,
        model_dtype=model_dtype, trust_remote_code=trust_remote_code,
        allow_pickle_weights=allow_pickle_weights, kernels=kernels, text_field=text_field,
        max_length=max_length, on_long=on_long, encoding_errors=encoding_errors,
        fail_on_nonfinite=fail_on_nonfinite, stats=stats, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
        sort_window_bytes=window, shard=shard, resume=resume, wait_timeout=wait_timeout,
        checkpoint_every=checkpoint_every, overwrite=overwrite, dry_run=dry_run, force=force, attn_layers=layer, attn_heads=heads,
        attn_mode=mode, attn_method=method, attn_precision=precision, max_attn_bytes=budget,
        command_line=["gdn-dump", *sys.argv[1:]], command="attn-matrix",
    ), quiet=quiet, debug=debug, png=png, png_log=png_log, png_max_prompts=png_max_prompts)


@app.command()
def hooks(
    model: str = ModelOpt,
    revision: Optional[str] = typer.Option(None, help="Model revision."),
    trust_remote_code: bool = typer.Option(False, help="Allow the checkpoint's own Python code to run."),
    debug: bool = DebugOpt,
) -> None:
    """Print the hook catalogue: every storable hook with its per-token shape and layer type."""
    from ..catalogue import GDN_HOOKS
    from ..model.load import catalogue as catalogue_of, load_config

    try:
        catalogue = catalogue_of(load_config(model, revision=revision, trust_remote_code=trust_remote_code))
    except Exception as exc:
        _fail(exc, debug)
    table = Table(title=f"hooks of {model} (short GDN names: {', '.join(GDN_HOOKS)})")
    for column in ("hook", "short", "layer", "layer type", "per-token shape", "dims", "kind"):
        table.add_column(column, overflow="fold")
    for spec in catalogue:
        table.add_row(spec.name, spec.short or "", "" if spec.layer is None else str(spec.layer),
                      spec.layer_type, str(list(spec.shape)), ",".join(spec.dims), spec.kind)
    _console().print(table)


@app.command()
def inspect(
    store: str = typer.Argument(..., help="A store written by gdn-dump (a directory or s3://bucket/prefix)."),
    debug: bool = DebugOpt,
) -> None:
    """Print a store's arrays, shapes, dtypes, sizes on disk, provenance and completeness."""
    import json

    from ..store.layout import format_bytes
    from ..store.create import ATTR, open_group, store_summary

    try:
        group = open_group(store)
        rows = store_summary(group)
    except Exception as exc:
        _fail(exc, debug)
    meta = dict(group.attrs[ATTR])
    table = Table(title=f"{store}  [status: {meta.get('status')}]")
    for column in ("array", "shape", "dtype", "chunks", "dims", "on disk"):
        table.add_column(column, justify="right" if column == "on disk" else "left",
                         overflow="fold")
    for row in rows:
        table.add_row(row["name"], str(row["shape"]), row["dtype"], str(row["chunks"]),
                      ",".join(row["dims"]), format_bytes(row["stored_bytes"]))
    table.caption = f"{sum(r['stored_bytes'] for r in rows):,} bytes on disk"
    _console().print(table)
    model = meta.get("model", {})
    _console().print(f"status: {meta.get('status')}")
    _console().print(f"model: {model.get('name')} ({model.get('dtype')}, {model.get('device')}, "
                      f"kernels: {model.get('kernel_backend')})")
    _console().print(f"prompts: {json.dumps(meta.get('prompts'))}")
    _console().print(f"storage dtype: {meta.get('storage_dtype')}, max length: {meta.get('max_length')}, "
                      f"truncated: {meta.get('truncated')}, skipped: {meta.get('skipped_long', 0)}")
    for key, what in (("nonfinite", "NaN/inf values"), ("overflow", "float16 overflow")):
        for name, count in (meta.get(key) or {}).items():
            _console().print(f"[red]{what} in {name}: {count:,}[/]")
    _console().print(f"created: {meta.get('created')}, command: {' '.join(meta.get('command_line', []))}")
    from ..ops.stats import table_rows

    stats_rows = table_rows(group)  # per-head statistics, written at finalize
    if stats_rows:
        def num(x):
            return "-" if x is None else f"{x:.4g}"

        stats = Table(title="statistics (over heads: mean of the per-head means, stds, L2 norms)")
        for column in ("array", "heads", "count", "mean", "std", "mean L2", "min", "max"):
            stats.add_column(column, justify="left" if column == "array" else "right",
                             overflow="fold")
        for r in stats_rows:
            stats.add_row(r["name"], f"{r['heads']} {r['heads_dim'] or ''}".strip(),
                          f"{r['count']:,}" + (f" (+{r['nonfinite']:,} NaN/inf)" if r["nonfinite"] else ""),
                          num(r["mean"]), num(r["std"]), num(r["mean_l2"]), num(r["min"]), num(r["max"]))
        _console().print(stats)
        for r in stats_rows:
            if "median_half_life" in r:
                _console().print(f"median half-life (tokens) per head, {r['name']}: "
                                 + " ".join(num(x) for x in r["median_half_life"]))


@app.command()
def plot(
    store: str = typer.Argument(..., help="A store written by gdn-dump (a directory or s3://bucket/prefix)."),
    kind: str = typer.Option(..., "--kind", "-k", help="decay (half-life ln(0.5)/g in tokens), beta, attn (an attention matrix) or norms (norm profile along the sequence)."),
    out: Path = typer.Option(..., "--out", "-o", help="The image to write (.png; its directory must exist)."),
    layer: Optional[int] = typer.Option(None, "--layer", help="decay/beta: per-head distributions of this layer; attn: the layer (default: the first with an attn_matrix); norms: one line per head of this layer."),
    head: Optional[int] = typer.Option(None, "--head", help="attn: the head (default 0); decay/beta: this head's distribution per layer (or in --layer); norms: this head's norm only (per layer, or in --layer)."),
    prompt: Optional[int] = typer.Option(None, "--prompt", help="0-based prompt index: attn's prompt (default 0); for the other kinds only this prompt (default: all)."),
    hook: str = typer.Option("recurrence_out", "--hook", help="norms: the hook, a short name (recurrence_out, v, q, ...) or a full array name."),
    width: float = typer.Option(10.0, help="Figure width in inches."),
    height: float = typer.Option(6.0, help="Figure height in inches."),
    dpi: int = typer.Option(100, help="Dots per inch: the image is width*dpi x height*dpi pixels."),
    debug: bool = DebugOpt,
) -> None:
    """Draw one figure of a store: decay half-lives, beta, an attention matrix or norm profiles."""
    from ..read.plots import plot_store
    from ..store.create import ATTR, open_group

    try:
        group = open_group(store)
        status = group.attrs[ATTR].get("status")
        path = plot_store(group, kind, out, layer=layer, head=head, prompt=prompt, hook=hook,
                          width=width, height=height, dpi=dpi, name=store)
    except Exception as exc:
        _fail(exc, debug)
    if status != "complete":
        _console(stderr=True).print(f"[yellow]warning:[/] {store} is {status}: rows not yet written "
                                    "read as zeros", highlight=False)
    _console(stderr=True).print(f"wrote {path}", highlight=False)


@app.command()
def finalize(
    store: str = typer.Argument(..., help="A store whose regions are all written (a directory or s3://bucket/prefix)."),
    debug: bool = DebugOpt,
) -> None:
    """Mark a store complete once every process's region is written (idempotent)."""
    from ..run.pipeline import finalize_store

    try:
        status = finalize_store(store)
    except Exception as exc:
        _fail(exc, debug)
    _console().print(f"{store}: {status}")


@app.command()
def verify(
    store: str = typer.Argument(..., help="A store written by gdn-dump (a directory or s3://bucket/prefix)."),
    allow_nonfinite: bool = typer.Option(False, help="Report NaN/inf values without failing."),
    debug: bool = DebugOpt,
) -> None:
    """Check that a store is complete and consistent; exit 0 only if every check holds."""
    from ..store.verify import render, verify_store

    try:
        checks = verify_store(store, allow_nonfinite=allow_nonfinite)
    except Exception as exc:
        _fail(exc, debug)
    _console().print(render(checks))
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


def main() -> None:
    """The ``gdn-dump`` entry point: the typer app, with click's own usage errors (a value that is
    not a number, an unknown option, a missing one) as one line on stderr too, exit 2."""
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="gdn-dump", standalone_mode=False)
    except _click_errors.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else exc.format_message())
        code = 0 if len(sys.argv) <= 1 else 2
    except _click_errors.UsageError as exc:
        where = f"; see {exc.ctx.command_path} --help" if exc.ctx else ""
        message = " ".join(exc.format_message().split()).rstrip(".")
        print(f"gdn-dump: error: {message}{where}", file=sys.stderr)
        code = 2
    except typer.Abort:  # Ctrl-C while click itself was reading input
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
