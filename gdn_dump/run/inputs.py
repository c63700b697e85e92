"""What the store will hold of the input: every prompt's stored length, decided once by the plan.

Three ways in, one result (:class:`InputPlan`):

- prompts (text, chats or token ids), each encoded once for its length, ``--max-length`` /
  ``--on-long`` applied, and with ``--max-tokens`` only the first prompts that fit (the last one
  cut to fit): every process encodes the prompts the store keeps.
- packed contexts (``--context-size N``) of one stream (:mod:`.packing`): the documents are encoded
  once for their lengths, up to ``--max-tokens // N`` contexts; the store is the same for any
  number of processes.
- packed contexts with ``--max-tokens`` and several processes: the documents are divided into
  contiguous ranges, one per process, and process i packs its own range into its region of
  ``M // N`` contexts; it reads only about 1/P of what is stored, and the store is the same
  whenever the number of processes is the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import GdnDumpError
from .packing import ContextStarts, count_contexts, pack
from .prompts import IdCheck
from .sources import Corpus
from .tokens import Encoder, describe, encoded_blocks, tokenized

STREAM, RANGES = "stream", "ranges"  # how packed documents are divided between processes
CONTEXT_ID = "ctx-{}"


@dataclass
class Packing:
    """How the contexts of a packed store were cut from the documents."""

    context_size: int
    separator: int  #: the EOS id ending each document
    mode: str  #: STREAM or RANGES
    starts: ContextStarts | None = None  #: STREAM: where every context begins
    ranges: list[tuple[int, int]] | None = None  #: RANGES: each region's documents

    def region_start(self, region: int, first_context: int) -> tuple[int, int]:
        """``(document, token offset)`` where the context ``first_context`` of ``region`` begins."""
        if self.mode == RANGES:
            return self.ranges[region][0], 0
        return self.starts.documents[first_context], self.starts.offsets[first_context]

    def provenance(self) -> dict:
        out = {"context_size": self.context_size, "separator": self.separator, "division": self.mode}
        if self.mode == STREAM:
            out.update(documents_read=self.starts.documents_read,
                       dropped_tokens=self.starts.tokens - len(self.starts) * self.context_size)
        else:
            out["document_ranges"] = [list(r) for r in self.ranges]
        return out


@dataclass
class InputPlan:
    lengths: np.ndarray  #: stored tokens of every prompt (context)
    truncated: int = 0  #: prompts cut by --max-length
    skipped: int = 0  #: prompts skipped by --on-long skip
    budget_tokens: int | None = None  #: tokens the budget kept out of the last prompt stored
    packing: Packing | None = None

    def prompt_ids(self, corpus: Corpus) -> Iterator[str]:
        if self.packing is not None:
            return (CONTEXT_ID.format(k) for k in range(len(self.lengths)))
        return (d.id for d in corpus.documents(0, len(self.lengths)))


def plan_inputs(opts, encode: Encoder, corpus: Corpus, processes: int, region: int,
                regions_for: Callable[[np.ndarray], list | None]) -> tuple[InputPlan, list | None]:
    """The input plan and the regions (``regions_for(lengths)``), for process ``region`` of
    ``processes``; every mistake in what it reads fails here, before anything is written."""
    if opts.context_size is None:
        inputs = _prompt_lengths(opts, encode, corpus)
        return inputs, regions_for(inputs.lengths)
    n = opts.context_size
    limit = opts.max_tokens // n if opts.max_tokens is not None else None
    if limit == 0:
        raise GdnDumpError(f"--max-tokens {opts.max_tokens} is less than one context "
                           f"(--context-size {n})")
    if processes > 1 and limit is not None:
        lengths = np.full(limit, n, dtype=np.int64)
        regions = regions_for(lengths)
        d = corpus.count
        ranges = [(p * d // processes, (p + 1) * d // processes) for p in range(processes)]
        _check_range(encode, corpus, n, ranges[region], regions[region], region, processes)
        return InputPlan(lengths, packing=Packing(n, encode.eos, RANGES, ranges=ranges)), regions
    starts = count_contexts(_lengths(encode, corpus.documents()), n, limit)
    if not len(starts):
        raise GdnDumpError(f"{corpus.display}: the documents hold {starts.tokens} tokens, less "
                           f"than one context of --context-size {n}")
    lengths = np.full(len(starts), n, dtype=np.int64)
    return InputPlan(lengths, packing=Packing(n, encode.eos, STREAM, starts=starts)), regions_for(lengths)


def _lengths(encode: Encoder, documents) -> Iterator[tuple[int, int]]:
    for block, ids in encoded_blocks(documents, encode):
        for document, token_ids in zip(block, ids):
            yield document.index, len(token_ids)


def _check_range(encode, corpus, n, documents: tuple[int, int], contexts: tuple[int, int],
                 region: int, processes: int) -> None:
    """This process's documents must fill its region: read them until they do."""
    need = (contexts[1] - contexts[0]) * n
    have = 0
    for _, length in _lengths(encode, corpus.documents(*documents)):
        have += length
        if have >= need:
            return
    if need:
        raise GdnDumpError(
            f"{corpus.display}: process {region}'s documents ({documents[0]}..{documents[1] - 1} "
            f"of {corpus.count}) hold {have // n} of the {need // n} contexts its share of "
            f"--max-tokens needs; lower --max-tokens, or run fewer than {processes} processes")


def _prompt_lengths(opts, encode: Encoder, corpus: Corpus) -> InputPlan:
    """Stored tokens of every prompt kept (after ``--max-length`` / ``--on-long``, up to
    ``--max-tokens``); ids checked unique; ``--on-long error`` fails here."""
    lengths, raw = [], []
    ids = IdCheck()
    budget = opts.max_tokens
    stored = 0
    cut = None
    for block, token_lists in encoded_blocks(corpus.documents(), encode):
        for document, tokens in zip(block, token_lists):
            ids.add(document)
            raw.append(len(tokens))
            length = len(tokens)
            if opts.max_length is not None and length > opts.max_length:
                length = opts.max_length if opts.on_long == "truncate" else 0
            if budget is not None and stored + length >= budget:
                cut = stored + length - budget
                lengths.append(budget - stored)
                break
            lengths.append(length)
            stored += length
        if cut is not None:
            break
    ids.check(corpus.documents(0, len(lengths)))
    lengths = np.array(lengths, dtype=np.int64)
    raw = np.array(raw, dtype=np.int64)
    long = raw > opts.max_length if opts.max_length is not None else np.zeros(len(raw), bool)
    if opts.on_long == "error" and long.any():
        first = int(np.argmax(long))
        raise GdnDumpError(
            f"{corpus.display}: prompt {describe(corpus, first)} has {int(raw[first])} tokens, over "
            f"--max-length {opts.max_length} ({int(long.sum())} prompt(s) in all); pass --on-long "
            "truncate or skip to go on")
    truncated = int(long.sum()) if opts.on_long == "truncate" else 0
    skipped = int(long.sum()) if opts.on_long == "skip" else 0
    return InputPlan(lengths, truncated, skipped, budget_tokens=cut)


def region_items(encode: Encoder, corpus: Corpus, inputs: InputPlan, region: int, lo: int,
                 hi: int, documents: dict | None = None) -> Iterator[tuple[int, Sequence[int]]]:
    """``(prompt index, token ids)`` for every prompt of the plan, read only in ``[lo, hi)``
    (``range(length)`` stands in elsewhere). Packed: each context's row documents go into
    ``documents[index]`` as it is cut."""
    if inputs.packing is None:
        yield from tokenized(corpus, encode, inputs.lengths, lo, hi)
        return
    packing, lengths = inputs.packing, inputs.lengths
    for index in range(lo):
        yield index, range(int(lengths[index]))
    if hi > lo:
        document, offset = packing.region_start(region, lo)
        stream = corpus.documents(document)
        contexts = pack(_encoded(encode, stream), packing.context_size, skip=offset)
        for index, (tokens, owners) in zip(range(lo, hi), contexts):
            if documents is not None:
                documents[index] = owners
            yield index, tokens.tolist()
    for index in range(hi, len(lengths)):
        yield index, range(int(lengths[index]))


def _encoded(encode: Encoder, documents) -> Iterator[tuple[int, list[int]]]:
    for block, ids in encoded_blocks(documents, encode):
        yield from ((document.index, token_ids) for document, token_ids in zip(block, ids))
