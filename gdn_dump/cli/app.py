"""The ``gdn-dump`` commands: parse (:mod:`.options`), call the library, render (:mod:`.render`).

Errors are not handled here: :class:`.options.Group` turns whatever a command raises into one line
on stderr and its exit code (a traceback with ``--debug``). Importing this module imports no torch:
extract, attn-matrix, contributions and hooks import the model code when they run, the others never do.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Optional

import typer

from . import options as o
from . import render
from ..errors import GdnDumpError

app = typer.Typer(cls=o.Group, help="Stream Gated DeltaNet internals of Qwen3.5 / Qwen3-Next models "
                  "into Zarr.", no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)

RUN_EPILOG = f"{o.SIZE_HELP}\n\n{o.NO_FLAGS_HELP}"
MODEL_PACKAGES = ("torch", "transformer_lens")


def _models(command: str, module: str):
    """Import ``module`` (it runs models), or fail in one line where torch or TransformerLens is
    missing: the base install reads stores, the ``extract`` extra runs models."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in MODEL_PACKAGES:
            raise
        raise GdnDumpError(f"gdn-dump {command} needs torch and TransformerLens: "
                           "pip install 'gdn-dump[extract]'") from exc


# Option names that differ from ExtractOptions' field names.
_FIELDS = {"sort_window": "sort_window_bytes", "max_bytes": "max_attn_bytes"}


def _options(command: str, values: dict, **given):
    """The ExtractOptions of a command: its parsed values (a command's ``locals()``) under the
    field names, what the command sets itself (``given``), and the command line."""
    from ..run.options import ExtractOptions

    fields = {f.name for f in dataclasses.fields(ExtractOptions)}
    kwargs = {_FIELDS.get(k, k): v for k, v in values.items() if _FIELDS.get(k, k) in fields}
    return ExtractOptions(**{**kwargs, **given}, command=command,
                          command_line=["gdn-dump", *sys.argv[1:]])


def _run(ctx: typer.Context, opts, *, quiet: bool, png: Optional[Path] = None,
         png_log: bool = False, png_max_prompts: int = 4) -> None:
    """Run the library's extract and report it: extract and attn-matrix differ only in options."""
    pipeline = _models(opts.command, "gdn_dump.run.pipeline")
    reporter = render.RichReporter(render.console(stderr=True), show=not quiet)
    ctx.meta[o.RUN] = reporter  # what an interrupt reports
    with render.quiet_libraries(quiet):
        result = pipeline.extract(opts, reporter)
    heatmaps = []
    if png and not opts.dry_run:
        from ..read.plots import attention_heatmaps

        heatmaps = attention_heatmaps(opts.out, png, result.model.tokenizer,
                                      max_prompts=png_max_prompts, log_scale=png_log)
    render.report_run(opts, result, quiet=quiet, heatmaps=heatmaps, png=png)


@app.command(cls=o.Command, epilog=RUN_EPILOG)
def extract(
    ctx: typer.Context, *,
    model: o.Model, revision: o.Revision = None, device: o.Device = "auto",
    model_dtype: o.ModelDtype = None, kernels: o.Kernels = "auto",
    trust_remote_code: o.TrustRemoteCode = False, allow_pickle_weights: o.AllowPickleWeights = False,
    prompts: o.Prompts, text_field: o.TextField = "text", id_field: o.IdField = "id",
    chat: o.Chat = False, messages_field: o.MessagesField = "messages",
    add_generation_prompt: o.AddGenerationPrompt = False, tokens_field: o.TokensField = None,
    context_size: o.ContextSize = None, max_tokens: o.MaxTokens = None,
    max_length: o.MaxLength = None,
    on_long: o.OnLong = "truncate", encoding_errors: o.EncodingErrors = "strict",
    hooks: o.Hooks = None, layers: o.Layers = "all",
    state_every: o.StateEvery = None, state_dtype: o.StateDtype = None,
    attn_layers: o.AttnLayers = None, attn_heads: o.Heads = None, attn_mode: o.Mode = "exact",
    attn_method: o.Method = "chunked", attn_precision: o.Precision = "float32",
    max_bytes: o.MaxBytes = "16GiB",
    out: o.Out, dtype: o.Dtype = "float16", chunk_tokens: o.ChunkTokens = None,
    shard_tokens: o.ShardTokens = None, compressor: o.Compressor = "none",
    writer: o.Writer = "tensorstore", stats: o.Stats = True,
    fail_on_nonfinite: o.FailOnNonfinite = False, overwrite: o.Overwrite = False,
    batch_size: o.BatchSize = 8, max_batch_tokens: o.MaxBatchTokens = None,
    sort_window: o.SortWindow = "1GiB",
    shard: o.Shard = None, resume: o.Resume = False, wait_timeout: o.WaitTimeout = 600.0,
    checkpoint_every: o.CheckpointEvery = 60.0,
    dry_run: o.DryRun = False, force: o.Force = False, quiet: o.Quiet = False,
    config: o.Config = None, debug: o.Debug = False,
) -> None:
    """Run prefill over the prompts and stream the selected hooks into a Zarr store."""
    _run(ctx, _options("extract", locals()), quiet=quiet)


@app.command("attn-matrix", cls=o.Command, epilog=RUN_EPILOG)
def attn_matrix(
    ctx: typer.Context, *,
    model: o.Model, revision: o.Revision = None, device: o.Device = "auto",
    model_dtype: o.ModelDtype = None, kernels: o.Kernels = "auto",
    trust_remote_code: o.TrustRemoteCode = False, allow_pickle_weights: o.AllowPickleWeights = False,
    prompts: o.Prompts, text_field: o.TextField = "text", id_field: o.IdField = "id",
    chat: o.Chat = False, messages_field: o.MessagesField = "messages",
    add_generation_prompt: o.AddGenerationPrompt = False, tokens_field: o.TokensField = None,
    context_size: o.ContextSize = None, max_tokens: o.MaxTokens = None,
    max_length: o.MaxLength = None,
    on_long: o.OnLong = "truncate", encoding_errors: o.EncodingErrors = "strict",
    layer: o.MatrixLayers = "all", heads: o.Heads = None, mode: o.Mode = "exact",
    method: o.Method = "chunked", precision: o.Precision = "float32", max_bytes: o.MaxBytes = "16GiB",
    png: o.Png = None, png_log: o.PngLog = False, png_max_prompts: o.PngMaxPrompts = 4,
    out: o.Out, stats: o.Stats = True, fail_on_nonfinite: o.FailOnNonfinite = False,
    overwrite: o.Overwrite = False,
    batch_size: o.BatchSize = 1, max_batch_tokens: o.MaxBatchTokens = None,
    sort_window: o.SortWindow = "1GiB",
    shard: o.Shard = None, resume: o.Resume = False, wait_timeout: o.WaitTimeout = 600.0,
    checkpoint_every: o.CheckpointEvery = 60.0,
    dry_run: o.DryRun = False, force: o.Force = False, quiet: o.Quiet = False,
    config: o.Config = None, debug: o.Debug = False,
) -> None:
    """Store attention matrices: the exact effective attention of GDN layers (M with
    o_i = sum_j M[i, j] v_j, checked against the layer's output on every prompt) and softmax
    patterns."""
    _run(ctx, _options("attn-matrix", locals(), hooks="", **{f"attn_{k}": v for k, v in (
        ("layers", layer), ("heads", heads), ("mode", mode), ("method", method),
        ("precision", precision))}), quiet=quiet, png=png, png_log=png_log,
        png_max_prompts=png_max_prompts)


@app.command(cls=o.Command, epilog=RUN_EPILOG)
def contributions(
    ctx: typer.Context, *,
    model: o.Model, revision: o.Revision = None, device: o.Device = "auto",
    model_dtype: o.ModelDtype = None, kernels: o.Kernels = "auto",
    trust_remote_code: o.TrustRemoteCode = False, allow_pickle_weights: o.AllowPickleWeights = False,
    prompts: o.Prompts, text_field: o.TextField = "text", id_field: o.IdField = "id",
    chat: o.Chat = False, messages_field: o.MessagesField = "messages",
    add_generation_prompt: o.AddGenerationPrompt = False, tokens_field: o.TokensField = None,
    context_size: o.ContextSize = None, max_tokens: o.MaxTokens = None,
    max_length: o.MaxLength = None,
    on_long: o.OnLong = "truncate", encoding_errors: o.EncodingErrors = "strict",
    layer: o.ContribLayers = "all", heads: o.Heads = None, logits: o.Logits = "next",
    vectors: o.Vectors = False, precision: o.Precision = "float32", max_bytes: o.MaxBytes = "16GiB",
    out: o.Out, stats: o.Stats = True, fail_on_nonfinite: o.FailOnNonfinite = False,
    overwrite: o.Overwrite = False,
    batch_size: o.BatchSize = 1, max_batch_tokens: o.MaxBatchTokens = None,
    sort_window: o.SortWindow = "1GiB",
    shard: o.Shard = None, resume: o.Resume = False, wait_timeout: o.WaitTimeout = 600.0,
    checkpoint_every: o.CheckpointEvery = 60.0,
    dry_run: o.DryRun = False, force: o.Force = False, quiet: o.Quiet = False,
    config: o.Config = None, debug: o.Debug = False,
) -> None:
    """Store what each source token writes, through each head, into the residual stream: the
    norms of the exact contributions c[h, i, j] (summing to the layer's output, checked on every
    prompt), their direct logit attribution, and with --vectors the vectors themselves."""
    _run(ctx, _options("contributions", locals(), hooks="", attn_layers=layer, attn_heads=heads,
                       attn_precision=precision, contrib_logits=logits, contrib_vectors=vectors),
         quiet=quiet)


@app.command(cls=o.Command, epilog=o.NO_FLAGS_HELP)
def hooks(
    model: o.Model, revision: o.Revision = None, trust_remote_code: o.TrustRemoteCode = False,
    debug: o.Debug = False,
) -> None:
    """Print the hook catalogue: every storable hook with its per-token shape and layer type."""
    from ..catalogue import GDN_HOOKS, STATE_HOOK

    load = _models("hooks", "gdn_dump.model.load")
    catalogue = load.catalogue(load.load_config(model, revision=revision,
                                                trust_remote_code=trust_remote_code))
    render.console().print(render.hooks_table(model, catalogue, [*GDN_HOOKS, STATE_HOOK]))


@app.command(cls=o.Command)
def inspect(store: o.StoreArg, debug: o.Debug = False) -> None:
    """Print a store's arrays, shapes, dtypes, sizes on disk, provenance and completeness."""
    from ..store.create import ATTR, open_group, store_summary

    group = open_group(store)
    render.print_inspect(store, dict(group.attrs[ATTR]), store_summary(group), render.stats_rows(group))


@app.command(cls=o.Command)
def plot(
    store: o.StoreArg, kind: o.Kind, out: o.FigureOut, layer: o.PlotLayer = None,
    head: o.PlotHead = None, prompt: o.PlotPrompt = None, query: o.PlotQuery = None,
    hook: o.PlotHook = "recurrence_out",
    width: o.Width = 10.0, height: o.Height = 6.0, dpi: o.Dpi = 100, debug: o.Debug = False,
) -> None:
    """Draw one figure of a store: decay half-lives, beta, an attention matrix, norm profiles,
    recurrent states, or per-source-token contributions and their logit attribution."""
    from ..read.plots import plot_store
    from ..read.reader import open_store

    opened = open_store(store)  # only finished prompts: on an in_progress store, those written
    path = plot_store(opened, kind, out, layer=layer, head=head, prompt=prompt, hook=hook,
                      width=width, height=height, dpi=dpi, name=store, query=query)
    render.print_plot(store, opened, path)


@app.command(cls=o.Command)
def finalize(store: o.StoreArg, debug: o.Debug = False) -> None:
    """Mark a store complete once every process's region is written (idempotent)."""
    from ..store.create import open_group
    from ..store.finalize import finalize_store  # run.pipeline's needs torch; this one does not

    render.console().print(f"{store}: {finalize_store(open_group(store, mode='r+'))}")


@app.command(cls=o.Command, epilog=o.NO_FLAGS_HELP)
def verify(store: o.StoreArg, allow_nonfinite: o.AllowNonfinite = False, debug: o.Debug = False) -> None:
    """Check that a store is complete and consistent; exit 0 only if every check holds."""
    from ..store.verify import verify_store

    checks = verify_store(store, allow_nonfinite=allow_nonfinite)
    render.console().print(render.verify_table(checks))
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@app.command(cls=o.Command, epilog=o.NO_FLAGS_HELP)
def export(
    store: o.StoreArg, format: o.ExportFormat, hook: o.ExportHooks, out: o.ExportOut,  # noqa: A002
    context_size: o.ExportContextSize = None, head: o.ExportHead = None,
    shuffle: o.Shuffle = True, seed: o.Seed = 0, dtype: o.ExportDtype = "float32",
    overwrite: o.ExportOverwrite = False, quiet: o.Quiet = False, debug: o.Debug = False,
) -> None:
    """Write a store's rows in a format trainers read: saelens (SAELens's activation cache, one
    row per context, shuffled on disk)."""
    from ..read.exports import exporter
    from ..read.reader import open_store

    export_format = exporter(format)
    opened = open_store(store)
    with render.export_progress(render.console(stderr=True), show=not quiet) as progress:
        done = export_format(opened, hook, out, context_size=context_size, head=head,
                             shuffle=shuffle, seed=seed, dtype=dtype, overwrite=overwrite,
                             progress=progress)
    if not quiet:
        render.console().print(render.export_table(done))


def main() -> None:
    """The ``gdn-dump`` entry point (:meth:`.options.Group.main` prints every error as one line)."""
    typer.main.get_command(app).main(prog_name="gdn-dump")
