"""Prompts to token ids, a block of prompts at a time (the tokenizer is much faster on lists).

The plan tokenises every prompt once for its length; the run tokenises again, only its own region
(:func:`tokenized`). Both apply ``--max-length`` and ``--on-long`` the same way, so the lengths
the plan laid out are the lengths the run stores.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np

TOKENIZE_BLOCK = 512
ON_LONG = ("truncate", "skip", "error")  # --on-long: what happens to a prompt over --max-length


def describe(source, index: int) -> str:
    """``3 (line 4, id 'x')``: where a prompt is, for error messages."""
    for prompt in source:
        if prompt.index == index:
            return f"{index} (line {prompt.line}, id {prompt.id!r})"
    return str(index)


def tokenized_blocks(source: Iterable, tokenizer, max_length: int | None, on_long: str = "truncate"):
    """Yield ``(first_index, token_lists, untruncated_lengths)`` for blocks of prompts."""
    block: list[str] = []
    start = 0
    for prompt in source:
        block.append(prompt.text)
        if len(block) == TOKENIZE_BLOCK:
            yield start, *tokenize(tokenizer, block, max_length, on_long)
            start += len(block)
            block = []
    if block:
        yield start, *tokenize(tokenizer, block, max_length, on_long)


def tokenize(tokenizer, texts: list[str], max_length: int | None, on_long: str = "truncate"):
    """Token ids of ``texts`` (a long one cut to ``max_length``, or empty with ``skip``) and
    their untruncated lengths."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    raw = [len(t) for t in ids]
    if max_length is not None:
        ids = [t[:max_length] if len(t) <= max_length or on_long == "truncate" else [] for t in ids]
    return ids, raw


def tokenized(source: Iterable, tokenizer, max_length: int | None, lengths: np.ndarray,
              lo: int = 0, hi: int | None = None,
              on_long: str = "truncate") -> Iterator[tuple[int, Sequence[int]]]:
    """``(prompt_index, token_ids)`` for every prompt in file order; prompts outside
    ``[lo, hi)`` are not tokenised (``range(length)`` stands in: batching needs only lengths)."""
    hi = len(lengths) if hi is None else hi
    block: list[str] = []
    first = lo

    def ids(texts):
        return enumerate(tokenize(tokenizer, texts, max_length, on_long)[0], first)

    for index, prompt in enumerate(source):
        if index < lo or index >= hi:
            if block:  # leaving the range: tokenise what was gathered
                yield from ids(block)
                block = []
            yield index, range(int(lengths[index]))
            continue
        block.append(prompt.text)
        if len(block) == TOKENIZE_BLOCK:
            yield from ids(block)
            first += len(block)
            block = []
    if block:
        yield from ids(block)
