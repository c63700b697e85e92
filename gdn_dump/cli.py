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
from rich.table import Table

from .errors import GdnDumpError

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
    _console(stderr=True).print(f"[red]gdn-dump: error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


ModelOpt = typer.Option(..., "--model", "-m", help="'tiny', a Hugging Face id or a local checkpoint directory.")
DebugOpt = typer.Option(False, "--debug", help="Show tracebacks.")


@app.command()
def extract(
    model: str = ModelOpt,
    prompts: str = typer.Option(..., "--prompts", "-p", help="Prompt file: .txt (a prompt per line), .jsonl, or - for stdin."),
    out: str = typer.Option(..., "--out", "-o", help="The Zarr store to write."),
    hooks: Optional[str] = typer.Option(None, help="Short GDN hook names for every selected layer and/or full TransformerLens hook names, comma separated. Default: q_pre_conv,k_pre_conv,v_pre_conv,q,k,v,beta,log_decay,recurrence_out."),
    layers: str = typer.Option("all", help="GDN layers for the short hook names: 'all', or indices and ranges like 0,1,4-6."),
    revision: Optional[str] = typer.Option(None, help="Model revision (branch, tag or commit)."),
    device: str = typer.Option("auto", help="auto, cuda[:N] or cpu."),
    model_dtype: Optional[str] = typer.Option(None, help="Model dtype: float32, float16 or bfloat16 (default bfloat16 on CUDA, float32 on CPU)."),
    trust_remote_code: bool = typer.Option(False, help="Allow the checkpoint's own Python code to run."),
    allow_pickle_weights: bool = typer.Option(False, help="Allow non-safetensors (pickle) weight files."),
    kernels: str = typer.Option("auto", help="GDN kernels: auto (fla on CUDA when installed, else torch), torch, fla."),
    text_field: str = typer.Option("text", help="jsonl field that holds the prompt."),
    max_length: Optional[int] = typer.Option(None, help="Truncate prompts to this many tokens (counted and recorded)."),
    batch_size: int = typer.Option(8, help="Prompts per batch."),
    max_batch_tokens: Optional[int] = typer.Option(None, help="Most padded tokens per batch."),
    dtype: str = typer.Option("float16", help="Storage dtype of vector hooks: float32, float16 or bfloat16 (per-head scalars stay float32)."),
    chunk_tokens: Optional[int] = typer.Option(None, help="Token rows per chunk (default: a few MB per chunk)."),
    compressor: str = typer.Option("none", help="none, zstd or blosc."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out."),
    dry_run: bool = typer.Option(False, help="Print the plan and exit without running the model."),
    force: bool = typer.Option(False, help="Run even if the estimate exceeds the free disk space."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or tables."),
    config: Optional[Path] = typer.Option(None, help="TOML file of option values (keys = option names).", callback=_load_config, is_eager=True),
    debug: bool = DebugOpt,
) -> None:
    """Run prefill over the prompts and stream the selected hooks into a Zarr store."""
    from .pipeline import ExtractOptions
    from .pipeline import extract as run_extract
    from .report import RichReporter, plan_table, summary_table

    opts = ExtractOptions(
        model=model, prompts=prompts, out=out, hooks=hooks, layers=layers, revision=revision,
        device=device, model_dtype=model_dtype, trust_remote_code=trust_remote_code,
        allow_pickle_weights=allow_pickle_weights, kernels=kernels, text_field=text_field, max_length=max_length,
        batch_size=batch_size, max_batch_tokens=max_batch_tokens, dtype=dtype,
        chunk_tokens=chunk_tokens, compressor=compressor, overwrite=overwrite, dry_run=dry_run,
        force=force, command_line=["gdn-dump", *sys.argv[1:]],
    )
    try:
        result = run_extract(opts, None if quiet else RichReporter(_console(stderr=True)))
    except KeyboardInterrupt:
        _console(stderr=True).print(f"gdn-dump: interrupted; {out} is left in_progress")
        raise typer.Exit(130) from None
    except Exception as exc:  # one line, never a traceback (unless --debug)
        _fail(exc, debug)
    if dry_run:
        _console().print(plan_table(result.plan, title=f"plan for {out} (dry run: nothing written)"))
        return
    for name, count in result.overflow.items():
        _console(stderr=True).print(f"[yellow]warning:[/] {count:,} values of {name} overflowed to inf "
                          f"when cast to {result.plan.storage_dtype}; use --dtype float32")
    if not quiet:
        _console(stderr=True).print(summary_table(result))


@app.command()
def hooks(
    model: str = ModelOpt,
    revision: Optional[str] = typer.Option(None, help="Model revision."),
    trust_remote_code: bool = typer.Option(False, help="Allow the checkpoint's own Python code to run."),
    debug: bool = DebugOpt,
) -> None:
    """Print the hook catalogue: every storable hook with its per-token shape and layer type."""
    from .catalogue import GDN_HOOKS, Catalogue
    from .models import load_config

    try:
        catalogue = Catalogue(load_config(model, revision=revision, trust_remote_code=trust_remote_code))
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
    store: Path = typer.Argument(..., help="A store written by gdn-dump."),
    debug: bool = DebugOpt,
) -> None:
    """Print a store's arrays, shapes, dtypes, sizes on disk, provenance and completeness."""
    import json

    from .plan import format_bytes
    from .store import ATTR, open_store, store_summary

    try:
        group = open_store(store)
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
    _console().print(f"storage dtype: {meta.get('storage_dtype')}, truncated: {meta.get('truncated')}")
    _console().print(f"created: {meta.get('created')}, command: {' '.join(meta.get('command_line', []))}")


def main() -> None:  # pragma: no cover - console entry point
    app()
