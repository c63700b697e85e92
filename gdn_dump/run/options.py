"""Everything a run takes (:class:`ExtractOptions`, the names are the CLI's option names), checked
once (:func:`resolve`) before anything is loaded or created.

The choices of each option are defined where they are implemented (dtypes, catalogue, kernels,
writer, prompts, tokens); this module only checks against them, and the CLI shows them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field

from ..catalogue import LOGITS_NEXT, MATRIX_METHODS, MATRIX_MODES, logit_target
from ..dtypes import MODEL_DTYPES, PRECISIONS, STATE_DTYPES, STORAGE_DTYPES, check
from ..errors import GdnDumpError
from ..model.kernels import KERNEL_CHOICES
from ..store.create import COMPRESSORS
from ..store.states import state_stride
from ..store.location import locate
from ..store.writer import WRITERS
from .sources import ENCODING_ERRORS, Fields
from .tokens import ON_LONG


SORT_WINDOW_BYTES = 1 << 30  # --sort-window's default
CONTRIBUTIONS = "contributions"  # the command that stores contributions, not matrices


@dataclass
class ExtractOptions:
    """Everything ``gdn-dump extract`` takes; the names are the CLI option names."""

    model: str
    prompts: str | list[str]  # paths, globs, datasets directories, "-" for stdin: one stream
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
    id_field: str = "id"
    chat: bool = False  # records hold conversations (messages_field), rendered by the chat template
    messages_field: str = "messages"
    add_generation_prompt: bool = False
    tokens_field: str | None = None  # records hold token ids, used as given
    context_size: int | None = None  # pack documents into contexts of exactly this many tokens
    max_tokens: int | None = None  # stop after this many stored tokens
    encoding_errors: str = "strict"  # or "replace": invalid UTF-8 becomes U+FFFD, lines counted
    max_length: int | None = None
    on_long: str = "truncate"  # a prompt over max_length: truncate, skip (no tokens) or error
    batch_size: int = 8
    max_batch_tokens: int | None = None
    # Prompts run longest first within windows of this many bytes of rows (0: file order); the
    # sink holds at most one window to put rows back in prompt order, and a prompt whose rows fill
    # a window by themselves streams (plan.stream_tokens).
    sort_window_bytes: int = SORT_WINDOW_BYTES
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
    command: str = "extract"  # or "attn-matrix", "contributions": names the layer option in errors
    contrib_logits: str = LOGITS_NEXT  # contributions --logits: next, none or a token id
    contrib_vectors: bool = False  # contributions --vectors: store every c_{h,i,j} too
    shard: str | None = None  # "I/N"; torchrun's RANK / WORLD_SIZE are read without it
    resume: bool = False  # continue from the store's progress ledger (or start if there is none)
    wait_timeout: float = 600.0  # seconds a process waits for process 0 to create the store
    checkpoint_every: float = 60.0  # seconds between progress records (at unit boundaries)
    fail_on_nonfinite: bool = False  # stop at the first batch with NaN/inf in a hook
    stats: bool = True  # per-head statistics of every stored array, computed while writing
    # snapshots of the recurrent state (hook ssm_state): a stride in tokens or "final"; None: the
    # default stride, and no error when no state hook is selected
    state_every: int | str | None = None
    state_dtype: str | None = None  # None: float32



def resolve(opts: ExtractOptions) -> ExtractOptions:
    """Check every option a user can get wrong (one line each) and settle what follows from them:
    the writer (TensorStore writes local files only; a remote store is written by zarr-python)."""
    _validate(opts)
    if opts.writer == "tensorstore" and not locate(opts.out).is_local:
        return dataclasses.replace(opts, writer="zarr")
    return opts


def _validate(opts: ExtractOptions) -> None:
    for option, value, choices in (
        ("--compressor", opts.compressor, COMPRESSORS), ("--kernels", opts.kernels, KERNEL_CHOICES),
        ("--writer", opts.writer, WRITERS), ("--dtype", opts.dtype, STORAGE_DTYPES),
        ("--mode", opts.attn_mode, MATRIX_MODES), ("--method", opts.attn_method, MATRIX_METHODS),
        ("--precision", opts.attn_precision, PRECISIONS), ("--on-long", opts.on_long, ON_LONG),
        ("--encoding-errors", opts.encoding_errors, ENCODING_ERRORS),
    ):
        check(option, value, choices)
    if opts.state_every is not None:
        state_stride(opts.state_every)
    logit_target(opts.contrib_logits)
    if opts.state_dtype is not None:
        check("--state-dtype", opts.state_dtype, STATE_DTYPES)
    if opts.model_dtype not in (None, "auto"):
        check("--model-dtype", opts.model_dtype, MODEL_DTYPES)
    if opts.writer == "tensorstore" and importlib.util.find_spec("tensorstore") is None:
        raise GdnDumpError("--writer tensorstore needs TensorStore: pip install tensorstore")
    if opts.batch_size < 1:
        raise GdnDumpError(f"--batch-size must be at least 1, not {opts.batch_size}")
    if opts.max_batch_tokens is not None and opts.max_batch_tokens < 1:
        raise GdnDumpError(f"--max-batch-tokens must be at least 1, not {opts.max_batch_tokens}")
    if opts.checkpoint_every < 0 or opts.wait_timeout < 0:
        raise GdnDumpError("--checkpoint-every and --wait-timeout must not be negative")
    if opts.sort_window_bytes < 0:
        raise GdnDumpError(f"--sort-window must be 0 (off) or a size, not {opts.sort_window_bytes}")
    if opts.max_length is not None and opts.max_length < 1:
        raise GdnDumpError(f"--max-length must be at least 1, not {opts.max_length}")
    for option, value in (("--context-size", opts.context_size), ("--max-tokens", opts.max_tokens)):
        if value is not None and value < 1:
            raise GdnDumpError(f"{option} must be at least 1, not {value}")
    if opts.context_size is not None and (opts.max_length is not None or opts.on_long != "truncate"):
        raise GdnDumpError("--max-length and --on-long do not apply with --context-size (every "
                           "context is exactly --context-size tokens)")
    if opts.add_generation_prompt and not opts.chat:
        raise GdnDumpError("--add-generation-prompt needs --chat")
    fields(opts).check()
    if opts.on_long != "truncate" and opts.max_length is None:
        raise GdnDumpError(f"--on-long {opts.on_long} needs --max-length (the length that is too long)")


def fields(opts: ExtractOptions) -> Fields:
    """Which fields of the input's records matter (one definition for the plan and the run)."""
    return Fields(text=opts.text_field, id=opts.id_field, messages=opts.messages_field,
                  tokens=opts.tokens_field, chat=opts.chat)
