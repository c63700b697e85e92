"""The plan of a run, made once from the options, the catalogue and the prompt lengths.

Every process computes the same plan from the input alone: the selection (hooks, matrices),
every prompt's stored length (:mod:`.inputs`: ``--max-length``, ``--on-long``, ``--max-tokens``,
packed contexts), the units of the run
(:mod:`gdn_dump.run.schedule`) and, for several processes, the regions
(:func:`gdn_dump.run.split.split_regions`), which depend only on those units. Then the store's
layout (:func:`gdn_dump.store.layout.make_plan`) is laid out once, with the regions.
"""

from __future__ import annotations

import numpy as np

from ..catalogue import STATE, Catalogue
from ..dtypes import STATE_DTYPE
from ..errors import GdnDumpError, SelectionError
from ..store.layout import Plan, bytes_per_token, format_bytes, make_plan, prompt_chunk
from ..store.states import DEFAULT_STATE_EVERY, state_stride
from ..store.location import Location
from .options import CONTRIBUTIONS, SORT_WINDOW_BYTES, ExtractOptions
from .inputs import InputPlan, plan_inputs
from .schedule import units
from .sources import Corpus
from .split import split_regions
from .tokens import Encoder, describe


def plan_run(opts: ExtractOptions, catalogue: Catalogue, encode: Encoder, source: Corpus,
             processes: int = 1, max_positions: int | None = None, region: int = 0
             ) -> tuple[Plan, InputPlan]:
    """Resolve the selection, decide every prompt's stored length (:mod:`.inputs`: each
    prompt or document encoded once), lay out the store with ``processes`` regions (each starting
    on a chunk boundary), and check the matrix budget."""
    matrices, contributions = select_matrices(opts, catalogue)
    hooks = catalogue.select(opts.hooks, opts.layers, allow_empty=bool(matrices or contributions))
    state_every, state_dtype = state_options(opts, any(h.kind == STATE for h in hooks))
    if opts.context_size is not None and max_positions is not None and opts.context_size > max_positions:
        raise GdnDumpError(f"--context-size {opts.context_size} is over the model's "
                           f"max_position_embeddings {max_positions}")
    row_bytes = bytes_per_token(hooks, opts.dtype, state_stride(state_every), state_dtype)

    def regions_for(lengths: np.ndarray) -> list[tuple[int, int]] | None:
        if processes == 1:
            return None
        cut_every = prompt_chunk(matrices, opts.attn_mode, len(lengths), contributions)
        starts = [min(p for batch in unit for p, _ in batch)
                  for unit in plan_units(opts, lengths, row_bytes, cut_every)]
        return split_regions(starts, lengths, processes, cut_every=cut_every)

    inputs, regions = plan_inputs(opts, encode, source, processes, region, regions_for)
    check_positions(inputs.lengths, max_positions, source)
    plan = make_plan(hooks, inputs.lengths, storage_dtype=opts.dtype, chunk_tokens=opts.chunk_tokens,
                     shard_tokens=opts.shard_tokens, max_length=opts.max_length,
                     truncated=inputs.truncated, skipped=inputs.skipped, matrices=matrices,
                     attn_mode=opts.attn_mode, regions=regions, state_every=state_every,
                     state_dtype=state_dtype, row_documents=inputs.packing is not None,
                     contributions=contributions)
    check_budget(plan, opts.max_attn_bytes)
    return plan, inputs


def select_matrices(opts: ExtractOptions, catalogue: Catalogue):
    """The attention matrices (``attn-matrix --layer``, ``extract --attn-layers``) or the
    contributions (``contributions --layer``) a run stores."""
    if opts.command == CONTRIBUTIONS:
        return [], catalogue.select_contributions(opts.attn_layers, opts.attn_heads,
                                                  opts.contrib_logits, opts.contrib_vectors)
    option = "--layer" if opts.command == "attn-matrix" else "--attn-layers"
    matrices = (catalogue.select_matrices(opts.attn_layers, opts.attn_heads, option)
                if opts.attn_layers else [])
    return matrices, []


def state_options(opts: ExtractOptions, states: bool) -> tuple[int | str, str]:
    """``--state-every`` and ``--state-dtype`` with their defaults; refused when given without a
    state hook (a stride that stores nothing is a mistake, not a no-op)."""
    if not states:
        given = [o for o, v in (("--state-every", opts.state_every),
                                ("--state-dtype", opts.state_dtype)) if v is not None]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            raise SelectionError(f"{' and '.join(given)} {verb} the state hook: add ssm_state to "
                                 "--hooks (e.g. --hooks default,ssm_state)")
    every = DEFAULT_STATE_EVERY if opts.state_every is None else opts.state_every
    return every, opts.state_dtype or STATE_DTYPE


def check_positions(lengths: np.ndarray, max_positions: int | None, source: Corpus) -> None:
    """Refuse, before anything is written, a prompt longer than the model's context
    (``max_position_embeddings``): its positions past it were never trained."""
    if max_positions is None or not len(lengths) or lengths.max() <= max_positions:
        return
    first = int(np.argmax(lengths > max_positions))
    raise GdnDumpError(
        f"{source.display}: prompt {describe(source, first)} has {int(lengths[first])} tokens, over "
        f"the model's max_position_embeddings {max_positions} "
        f"({int((lengths > max_positions).sum())} prompt(s) in all); pass --max-length "
        f"{max_positions} (they are truncated; --on-long skip or error otherwise)"
    )


def plan_units(opts: ExtractOptions, lengths: np.ndarray, row_bytes: int,
               cut_every: int | None, items=None):
    """The units of the run (see :mod:`gdn_dump.run.schedule`) for rows of ``row_bytes`` bytes a
    token; by default from lengths alone (``range(n)`` stands in for a prompt's tokens: batching
    needs only lengths)."""
    if items is None:
        items = ((p, range(n)) for p, n in enumerate(lengths.tolist()))
    return units(items, opts.batch_size, opts.max_batch_tokens, window_tokens(opts, row_bytes),
                 cut_every, stream_tokens(opts, row_bytes))


def window_tokens(opts: ExtractOptions, row_bytes: int) -> int | None:
    """Tokens per sorting window: ``--sort-window`` bytes of rows (None: no sorting; packed
    contexts are all as long, so sorting them saves nothing, and each batch is a unit: regions
    of several processes then divide the contexts evenly)."""
    if not opts.sort_window_bytes or opts.context_size is not None:
        return None
    return max(1, opts.sort_window_bytes // max(row_bytes, 1))


def stream_tokens(opts: ExtractOptions, row_bytes: int) -> int:
    """Tokens of a prompt whose rows fill a sorting window by themselves (the default window's
    size when sorting is off): such a prompt streams, its rows written as they are captured, so the
    host never holds more than about a window of rows, however long the prompt."""
    return max(1, (opts.sort_window_bytes or SORT_WINDOW_BYTES) // max(row_bytes, 1))


def check_budget(plan: Plan, max_bytes: int) -> None:
    """Refuse, before any model runs, a plan whose attention matrices exceed ``max_bytes``."""
    if plan.matrix_bytes > max_bytes:
        raise GdnDumpError(
            f"the {'contributions' if plan.contributions else 'attention matrices'} need "
            f"{format_bytes(plan.matrix_bytes)} ({plan.n_prompts} "
            f"prompts, longest {int(plan.prompt_lengths.max())} tokens), over --max-bytes "
            f"{format_bytes(max_bytes)}; select fewer layers, --heads, shorter --max-length, or "
            "raise --max-bytes"
        )


def check_free_space(loc: Location, needed: int) -> None:
    """Refuse a run that cannot fit on the target disk (``--force`` skips this check)."""
    free = loc.free_bytes()
    if free is not None and needed > free:
        raise GdnDumpError(
            f"the store needs about {format_bytes(needed)} but {loc} has {format_bytes(free)} "
            "free; free space, write elsewhere, or pass --force"
        )
