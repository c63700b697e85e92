"""How the command line is parsed: every option declared once (with the value types of
:mod:`.values`), and the classes that parse, show help and fail the same way for every command.

Each option is an ``Annotated`` alias used by every command that takes it (``model: Model``); a
command puts its own default in its signature where commands differ (``batch_size: BatchSize = 8``).
Choices come from the list the library defines (dtypes, kernels, compressors, ...), never retyped;
they are checked while parsing and worded as the library words them (``--dtype must be one of
float32, float16, bfloat16, not 'float8'``). No torch here: the lists live in torch-free modules.
"""

from __future__ import annotations

import contextlib
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

import typer
import typer.core

from ..catalogue import DEFAULT_HOOKS, LOGITS_NEXT, LOGITS_NONE, MATRIX_METHODS, MATRIX_MODES
from ..dtypes import MODEL_DTYPES, PRECISIONS, STATE_DTYPE, STATE_DTYPES, STORAGE_DTYPES
from ..errors import GdnDumpError, Terminated
from ..model.kernels import KERNEL_CHOICES
from ..read.figures import KINDS
from ..run.prompts import ENCODING_ERRORS
from ..run.tokens import ON_LONG
from ..store.create import COMPRESSORS
from ..store.states import DEFAULT_STATE_EVERY, STATE_FINAL
from ..store.writer import WRITERS

from .values import (  # noqa: F401 - SIZE_UNITS, parse_size, parse_count: also read from here
    SIZE_HELP, SIZE_UNITS, Choice, click_errors, count_option, parse_count,
    parse_size, size_option, state_every_option)

DEBUG = "gdn_dump.debug"  # ctx.meta key: --debug was given (tracebacks instead of one line)
RUN = "gdn_dump.run"  # ctx.meta key: the reporter of the run under way (what Ctrl-C reports)


# --- --config and --debug ---------------------------------------------------------------------------

def _load_config(ctx, param, value: Optional[Path]):
    """``--config FILE.toml``: its keys are option names; options given on the command line win."""
    if value is None:
        return value
    try:
        data = tomllib.loads(Path(value).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise GdnDumpError(f"--config {value}: cannot read it ({exc})") from exc
    known = {p.name: p for p in ctx.command.params}
    defaults = {}
    for key, item in data.items():
        name = key.replace("-", "_")
        if name not in known or name == "config":
            raise GdnDumpError(f"--config {value}: unknown key {key!r}; keys are option names")
        if getattr(known[name], "multiple", False):  # e.g. prompts: a path or a list of them
            defaults[name] = list(map(str, item)) if isinstance(item, list) else [item]
        else:
            defaults[name] = ",".join(map(str, item)) if isinstance(item, list) else item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _record_debug(ctx, param, value: bool) -> bool:
    if value:
        ctx.meta[DEBUG] = True
    return value


# --- the options --------------------------------------------------------------------------------------

MODEL, PROMPTS, HOOKS, MATRICES, STORE, BATCHING, PROCESSES, CONTROL = (
    "Model", "Prompts", "Hooks and layers", "Attention matrices", "Store", "Batching and speed",
    "Many processes", "Run control")
FIGURE, IMAGE = "Figure", "Image"
EXPORT = "Export"


def option(*names: str, panel: str, **kw) -> typer.models.OptionInfo:
    return typer.Option(*names, rich_help_panel=panel, **kw)


def choice(choices: Sequence[str], *names: str, panel: str, help: str, **kw):
    """An option taking one of ``choices``: shown as ``a|b|c``, checked while parsing."""
    parser = Choice(choices, **({"message": kw.pop("message")} if "message" in kw else {}))
    return typer.Option(*names, parser=parser, metavar=parser.metavar, rich_help_panel=panel,
                        help=help, **kw)


def size(*names: str, panel: str, help: str):
    return typer.Option(*names, parser=size_option, metavar="SIZE", rich_help_panel=panel, help=help)


# Model
Model = Annotated[str, option("--model", "-m", metavar="MODEL", panel=MODEL,
                              help="'tiny', a Hugging Face id or a local checkpoint directory.")]
Revision = Annotated[Optional[str], option(metavar="REV", panel=MODEL,
                                           help="Model revision: branch, tag or commit.")]
Device = Annotated[str, option(metavar="DEVICE", panel=MODEL, help="auto, cpu or cuda[:N].")]
ModelDtype = Annotated[Optional[str], choice(
    ("auto", *MODEL_DTYPES), panel=MODEL, show_default="auto: bfloat16 on CUDA, float32 on CPU",
    help="The dtype the model runs in.")]
Kernels = Annotated[str, choice(KERNEL_CHOICES, panel=MODEL,
                                help="GDN kernels: auto is fla on CUDA when installed, else torch.")]
TrustRemoteCode = Annotated[bool, option(panel=MODEL,
                                         help="Allow the checkpoint's own Python code to run.")]
AllowPickleWeights = Annotated[bool, option(panel=MODEL,
                                            help="Allow non-safetensors (pickle) weight files.")]

# Prompts
Prompts = Annotated[list[str], option("--prompts", "-p", metavar="PATH", panel=PROMPTS, help=(
    ".txt (a prompt per line), .jsonl, .parquet, a datasets save_to_disk directory, .gz / .zst "
    "compressed, - for stdin; a glob or several --prompts: one stream, files in sorted order."))]
TextField = Annotated[str, option(metavar="FIELD", panel=PROMPTS,
                                  help="The field that holds the prompt (.jsonl, .parquet, datasets).")]
IdField = Annotated[str, option(metavar="FIELD", panel=PROMPTS, help=(
    "The field that holds a record's id (absent: its 0-based line or row index in the stream)."))]
Chat = Annotated[bool, option(panel=PROMPTS, help=(
    "Records hold conversations (--messages-field: a list of {role, content}), rendered with the "
    "tokenizer's chat template."))]
MessagesField = Annotated[str, option(metavar="FIELD", panel=PROMPTS,
                                      help="With --chat: the field that holds the messages.")]
AddGenerationPrompt = Annotated[bool, option(panel=PROMPTS, help=(
    "With --chat: end each conversation with the template's assistant turn opening."))]
TokensField = Annotated[Optional[str], option(metavar="FIELD", panel=PROMPTS, help=(
    "Records hold token ids in this field (a list of ints), used as given: no special tokens added."))]
ContextSize = Annotated[Optional[int], option(metavar="N", panel=PROMPTS, help=(
    "Pack documents (each ended by EOS, no other special tokens) into contexts of exactly N tokens "
    "(ids ctx-<k>; row_document says which document each row came from)."))]
MaxTokens = Annotated[Optional[int], option(metavar="COUNT", panel=PROMPTS, parser=count_option, help=(
    "Stop after this many stored tokens (e.g. 50M, 2B): packed, COUNT // N contexts; else the "
    "prompts in order, the last one cut to fit."))]
MaxLength = Annotated[Optional[int], option(metavar="N", panel=PROMPTS,
                                            help="Longest prompt in tokens; see --on-long.")]
OnLong = Annotated[str, choice(ON_LONG, panel=PROMPTS, help=(
    "A prompt over --max-length: truncate it, skip it (stored with no tokens) or error (before "
    "anything is written); counted and recorded."))]
EncodingErrors = Annotated[str, choice(ENCODING_ERRORS, panel=PROMPTS, help=(
    "Invalid UTF-8 in the prompt file: strict stops, naming the line; replace reads U+FFFD "
    "(lines counted and recorded)."))]

# Hooks and layers
Hooks = Annotated[Optional[str], option(
    metavar="LIST", panel=HOOKS, show_default=",".join(DEFAULT_HOOKS), help=(
        "Short GDN hook names, applied to every --layers layer (all: every per-token GDN hook; "
        "default: the default set; ssm_state: the recurrent state, see --state-every), and/or "
        "full TransformerLens hook names; comma separated."))]
Layers = Annotated[str, option(metavar="LIST", panel=HOOKS,
                               help="GDN layers for the short names: all, or e.g. 0,1,4-6.")]
StateEvery = Annotated[Optional[str], option(
    metavar=f"N|{STATE_FINAL}", panel=HOOKS, parser=state_every_option, show_default=str(DEFAULT_STATE_EVERY),
    help=("With the hook ssm_state: a snapshot of S_t after every N-th token and each prompt's "
          f"last ({STATE_FINAL}: the last only); store.state() gives S_t at any t."))]
StateDtype = Annotated[Optional[str], choice(STATE_DTYPES, panel=HOOKS, show_default=STATE_DTYPE,
                                             help="Storage dtype of the state snapshots.")]

# Attention matrices
AttnLayers = Annotated[Optional[str], option(
    metavar="LIST", panel=MATRICES,
    help="Also store the attention matrix (blocks.<i>.attn_matrix) of these layers: all or a list.")]
MatrixLayers = Annotated[str, option("--layer", "--layers", metavar="LIST", panel=MATRICES, help=(
    "all, or e.g. 3 or 0,4-6: GDN layers give the effective attention, softmax layers their "
    "hook_pattern."))]
Heads = Annotated[Optional[str], option("--heads", metavar="LIST", panel=MATRICES, show_default="all",
                                        help="Heads of each matrix layer: all or e.g. 0,2,5-7.")]
Mode = Annotated[str, choice(MATRIX_MODES, "--mode", panel=MATRICES, help=(
    "exact: the GDN output decomposition; heuristic: TransformerLens's formula."))]
Method = Annotated[str, choice(MATRIX_METHODS, "--method", panel=MATRICES, help=(
    "The exact GDN matrix: chunked (identity-value chunk kernel, O(L^2 d_k)) or closed_form "
    "(triangular solve, O(L^3))."))]
Precision = Annotated[str, choice(PRECISIONS, "--precision", panel=MATRICES,
                                  help="Compute the GDN matrix in this (stored as float32).")]
MaxBytes = Annotated[int, size("--max-bytes", panel=MATRICES, help=(
    "Refuse a run whose attention matrices would need more (checked before the model loads)."))]
Png = Annotated[Optional[Path], option(metavar="DIR", panel=MATRICES,
                                       help="Write a heatmap per (prompt, layer, head) here.")]
PngLog = Annotated[bool, option(panel=MATRICES, help="Log colour scale (of |M|) for the heatmaps.")]
PngMaxPrompts = Annotated[int, option(metavar="N", panel=MATRICES,
                                      help="Heatmaps for this many prompts (the first ones).")]

# Contributions
ContribLayers = Annotated[str, option("--layer", "--layers", metavar="LIST", panel=MATRICES, help=(
    "all, or e.g. 3 or 0-7: GDN and softmax-attention layers whose per-source-token "
    "contributions are stored."))]
Logits = Annotated[str, option("--logits", metavar=f"{LOGITS_NEXT}|{LOGITS_NONE}|ID", panel=MATRICES, help=(
    "Direct logit attribution of every contribution (blocks.<i>.contribution_logit): to the next "
    "token's logit, to a fixed token id's, or none."))]
Vectors = Annotated[bool, option("--vectors", panel=MATRICES, help=(
    "Also store every contribution vector (blocks.<i>.contribution, d_model floats per head, "
    "query and key: small runs; counted by --max-bytes)."))]

# Store
Out = Annotated[str, option("--out", "-o", metavar="STORE", panel=STORE,
                            help="The Zarr store to write: a directory or s3://bucket/prefix.")]
Dtype = Annotated[str, choice(STORAGE_DTYPES, panel=STORE, help=(
    "Storage dtype of vector hooks (per-head scalars stay float32)."))]
ChunkTokens = Annotated[Optional[int], option(metavar="N", panel=STORE, show_default="a few MB",
                                              help="Token rows per chunk.")]
ShardTokens = Annotated[Optional[int], option(metavar="N", panel=STORE, help=(
    "Group chunks into shard files of about N token rows (zarr's sharding codec); whole shards "
    "are written at once."))]
Compressor = Annotated[str, choice(COMPRESSORS, panel=STORE, help="Chunk compression.")]
Writer = Annotated[str, choice(WRITERS, panel=STORE, help=(
    "Who writes the chunks: zarr-python or TensorStore's zarr3 driver; byte-identical stores."))]
Stats = Annotated[bool, option("--stats/--no-stats", panel=STORE, help=(
    "Per-head statistics of every stored array, computed while writing (on the GPU when there is "
    "one; on the CPU about 0.6 GB/s of one core)."))]
FailOnNonfinite = Annotated[bool, option(panel=STORE, help=(
    "Stop at the first batch with NaN/inf in a stored hook (always counted per array)."))]
Overwrite = Annotated[bool, option(panel=STORE, help=(
    "Replace an existing gdn-dump store at --out (never anything else)."))]

# Batching and speed
BatchSize = Annotated[int, option(metavar="N", panel=BATCHING, help="Prompts per batch.")]
MaxBatchTokens = Annotated[Optional[int], option(metavar="N", panel=BATCHING,
                                                 help="Most padded tokens per batch.")]
SortWindow = Annotated[int, size(panel=BATCHING, help=(
    "Run prompts longest first within windows of this many bytes of rows (less padding; the "
    "store keeps file order; bounds the reorder memory); 0: file order. A prompt whose rows fill "
    "a window by themselves (1 GiB when 0) is written as it is captured, in pieces."))]

# Many processes
Shard = Annotated[Optional[str], option(metavar="I/N", panel=PROCESSES, help=(
    "This process's share of the prompts, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; "
    "under torchrun RANK/WORLD_SIZE are used without it."))]
Resume = Annotated[bool, option(panel=PROCESSES, help=(
    "Continue the run recorded in --out (killed, preempted), or start it if there is none; "
    "refused if the settings differ."))]
WaitTimeout = Annotated[float, option(metavar="SEC", panel=PROCESSES, help=(
    "How long a process other than 0 waits for process 0 to create the store."))]
CheckpointEvery = Annotated[float, option(metavar="SEC", panel=PROCESSES, help=(
    "Time between progress records (what --resume starts from)."))]

# Run control
DryRun = Annotated[bool, option(panel=CONTROL, help=(
    "Print the plan and exit: no weights loaded, nothing written."))]
Force = Annotated[bool, option(panel=CONTROL,
                               help="Run even if the estimate exceeds the free disk space.")]
Quiet = Annotated[bool, option("--quiet", "-q", panel=CONTROL, help=(
    "No progress bars (the libraries' too), no tables."))]
Config = Annotated[Optional[Path], option(metavar="FILE", panel=CONTROL, callback=_load_config,
                                          is_eager=True, help=(
    "TOML file of option values (keys: option names); the command line wins."))]
Debug = Annotated[bool, option("--debug", panel=CONTROL, callback=_record_debug, is_eager=True,
                               help="Show the traceback of an error.")]

# Reading commands: the store argument, plot's options
StoreArg = Annotated[str, typer.Argument(metavar="STORE", show_default=False, help=(
    "A store written by gdn-dump: a directory or s3://bucket/prefix."))]
Kind = Annotated[str, choice(KINDS, "--kind", "-k", panel=FIGURE,
                             message="{option} {value!r} is unknown: one of {choices}", help=(
    "decay: half-life ln(0.5)/g in tokens; beta; attn: an attention matrix; norms: the norm "
    "profile along the sequence; state: the recurrent state's norm, effective rank and "
    "spectrum; contrib: how much each source token writes into each position through one head "
    "(from gdn-dump contributions); logit: which source tokens pushed the prediction at one "
    "position (direct logit attribution per layer)."))]
FigureOut = Annotated[Path, option("--out", "-o", metavar="FILE", panel=FIGURE,
                                   help="The image to write (.png; its directory must exist).")]
PlotLayer = Annotated[Optional[int], option("--layer", metavar="N", panel=FIGURE, help=(
    "decay/beta: per-head distributions of this layer; attn, state, contrib: the layer (default: "
    "the first with an attn_matrix, with states, with contributions); logit: a row per head of "
    "this layer (default: a row per layer); norms: a line per head of this layer."))]
PlotHead = Annotated[Optional[int], option("--head", metavar="N", panel=FIGURE, help=(
    "attn: the head (default 0); contrib: the head (default: the first stored); decay/beta: this "
    "head's distribution per layer (or in --layer); logit, norms, state: this head only."))]
PlotPrompt = Annotated[Optional[int], option("--prompt", metavar="N", panel=FIGURE, help=(
    "0-based prompt index: the prompt of attn, contrib and logit (default 0); state's (default: "
    "the first with snapshots); the other kinds: only this prompt (default: all)."))]
PlotQuery = Annotated[Optional[int], option("--query", metavar="I", panel=FIGURE, help=(
    "logit: the position whose prediction is explained (default: the prompt's last with a "
    "target: n-2 for the next token, n-1 for --logits ID)."))]
PlotHook = Annotated[str, option("--hook", metavar="HOOK", panel=FIGURE, help=(
    "norms: a short name (recurrence_out, v, q, ...) or a full array name."))]
Width = Annotated[float, option(metavar="IN", panel=IMAGE, help="Figure width in inches.")]
Height = Annotated[float, option(metavar="IN", panel=IMAGE, help="Figure height in inches.")]
Dpi = Annotated[int, option(metavar="N", panel=IMAGE,
                            help="Dots per inch: the image is width*dpi x height*dpi pixels.")]
AllowNonfinite = Annotated[bool, option(panel=CONTROL, help="Report NaN/inf values without failing.")]

# export
ExportFormat = Annotated[str, option("--format", metavar="NAME", panel=EXPORT, help=(
    "The format to write: saelens (SAELens's activation cache, a datasets directory)."))]
ExportHooks = Annotated[list[str], option("--hook", metavar="HOOK", panel=EXPORT, help=(
    "A per-token hook array of the store (e.g. blocks.0.linear_attn.hook_v); several --hook: a "
    "directory per hook under --out."))]
ExportOut = Annotated[Path, option("--out", "-o", metavar="DIR", panel=EXPORT,
                                   help="The directory to write.")]
ExportContextSize = Annotated[Optional[int], option(metavar="N", panel=EXPORT, help=(
    "Tokens per context (default: the store's --context-size when it was packed); each "
    "prompt's rows past a multiple of N are dropped."))]
ExportHead = Annotated[Optional[int], option(metavar="H", panel=EXPORT, help=(
    "Only this head of a hook with heads (default: every head, flattened to d_in = heads * d)."))]
Shuffle = Annotated[bool, option(panel=EXPORT, help="Shuffle the contexts on disk (SAELens reads in order).")]
Seed = Annotated[int, option(metavar="S", panel=EXPORT, help="The shuffle's seed.")]
ExportDtype = Annotated[str, choice(("float32", "float16"), panel=EXPORT, help="The activations' dtype.")]
ExportOverwrite = Annotated[bool, option(panel=EXPORT, help=(
    "Replace an existing export at --out (never anything else)."))]

NO_FLAGS_HELP = ("Each on/off option also takes its --no- form (e.g. --no-resume), which undoes a "
                 "--config value.")


# --- the command classes: help at 80 columns, one way to fail -------------------------------------

class _Help:
    """Help from :func:`gdn_dump.cli.help.help_text`: panels, short metavars, 80 columns."""

    def format_help(self, ctx, formatter) -> None:
        from .help import help_text

        formatter.write(help_text(self, ctx))


class Command(_Help, typer.core.TyperCommand):
    """A ``gdn-dump`` command."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        # --debug is recorded before anything else is parsed, so that an error raised while parsing
        # (a --config file given before it) honours it too; its callback covers a config's debug.
        if "--debug" in (args[:args.index("--")] if "--" in args else args):
            ctx.meta[DEBUG] = True
        return super().parse_args(ctx, args)


class Group(_Help, typer.core.TyperGroup):
    """The ``gdn-dump`` group: the one place an error becomes one line on stderr and an exit code.

    :meth:`invoke` catches whatever a command (or the parsing of its options) raised; :meth:`main`
    the group's own usage errors. Both work through ``CliRunner().invoke(app, ...)`` (the tests)
    and through :func:`gdn_dump.cli.app.main` (the console script).
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, SystemExit, click_errors.NoArgsIsHelpError):
            raise
        except BaseException as exc:
            from .render import report_error

            if ctx.meta.get(DEBUG) and not isinstance(exc, (KeyboardInterrupt, Terminated)):
                with contextlib.suppress(AttributeError):  # main() lets it through too
                    exc.gdn_dump_reraised = True
                raise
            raise typer.Exit(report_error(exc, ctx.meta.get(RUN))) from None

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, **extra) -> Any:
        from .render import report_error

        arguments = list(sys.argv[1:] if args is None else args)
        try:
            # always named gdn-dump (CliRunner would say "root", python -m "python -m gdn_dump")
            code = super().main(arguments, "gdn-dump", complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as exc:
            print(exc.ctx.get_help() if exc.ctx else exc.format_message())
            code = 0 if not arguments else 2
        except click_errors.UsageError as exc:
            if getattr(exc, "gdn_dump_reraised", False):
                raise
            code = report_error(exc, None)
        except typer.Abort:  # Ctrl-C or end of input while click itself was reading input
            code = 130
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code
