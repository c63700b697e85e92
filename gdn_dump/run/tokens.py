"""Documents to token ids, a block at a time (the tokenizer is much faster on lists).

One :class:`Encoder` per run says how a document becomes ids, by what it holds: text is tokenized
(with the tokenizer's special tokens, or none when packing: then each document is followed by EOS),
a chat is rendered by the tokenizer's own chat template first, token ids are used as given. The
plan encodes each document once for its length; the run encodes again, only its own region.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from ..errors import GdnDumpError
from .sources import CHAT, TEXT, Document

TOKENIZE_BLOCK = 512  # documents a tokenizer call takes at most
# ... and characters: a block of long documents stays small, so a plan that stops at a budget
# reads little past it
TOKENIZE_CHARS = 1 << 16
ON_LONG = ("truncate", "skip", "error")  # --on-long: what happens to a prompt over --max-length


class Encoder:
    """How a document of this run becomes token ids.

    ``packed``: no special tokens are added (the template's own stay) and EOS ends each document.
    ``vocab_size``: token ids given as such must be below it (the model's embedding rows).
    """

    def __init__(self, tokenizer, mode: str = TEXT, *, packed: bool = False,
                 vocab_size: int | None = None, add_generation_prompt: bool = False,
                 model: str = "the model"):
        self.tokenizer, self.mode, self.packed = tokenizer, mode, packed
        self.vocab_size = vocab_size if vocab_size is not None else len(tokenizer)
        self.add_generation_prompt = add_generation_prompt
        if mode == CHAT and not getattr(tokenizer, "chat_template", None):
            raise GdnDumpError(f"--chat: the tokenizer of {model} has no chat template "
                               "(tokenizer.chat_template is unset); give the prompts as text")
        self.eos = tokenizer.eos_token_id if packed else None
        if packed and self.eos is None:
            raise GdnDumpError(f"--context-size: the tokenizer of {model} has no EOS token to "
                               "end each document with")

    def __call__(self, documents: Sequence[Document]) -> list[list[int]]:
        if self.mode == TEXT:
            ids = self.tokenizer([d.text for d in documents],
                                 add_special_tokens=not self.packed)["input_ids"]
        elif self.mode == CHAT:
            ids = [self.chat(d) for d in documents]
        else:
            ids = [self._given(d) for d in documents]
        if self.eos is not None:
            ids = [[*t, self.eos] for t in ids]
        return ids

    def chat(self, document: Document) -> list[int]:
        """The conversation rendered by the chat template and tokenized as ``apply_chat_template``
        does (no special tokens added beyond the template's)."""
        text = self.tokenizer.apply_chat_template(
            list(document.messages), tokenize=False,
            add_generation_prompt=self.add_generation_prompt)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _given(self, document: Document) -> list[int]:
        ids = list(document.token_ids)
        high = max(ids)
        if high >= self.vocab_size:
            at = ids.index(high)
            raise GdnDumpError(f"{document.where}: token id {high} (position {at}) is outside the "
                               f"model's vocabulary (size {self.vocab_size})")
        return ids


def describe(source, index: int) -> str:
    """``3 (line 4, id 'x')``: where a prompt is, for error messages."""
    for prompt in source.documents(index, index + 1):
        return f"{index} ({prompt.unit} {prompt.line}, id {prompt.id!r})"
    return str(index)


def encoded_blocks(documents: Iterable[Document], encode: Encoder
                   ) -> Iterator[tuple[list[Document], list[list[int]]]]:
    """``(documents, their token ids)`` in blocks of :data:`TOKENIZE_BLOCK` documents or
    :data:`TOKENIZE_CHARS` characters, whichever comes first."""
    block: list[Document] = []
    size = 0
    for document in documents:
        block.append(document)
        size += _size(document)
        if len(block) == TOKENIZE_BLOCK or size >= TOKENIZE_CHARS:
            yield block, encode(block)
            block, size = [], 0
    if block:
        yield block, encode(block)


def _size(document: Document) -> int:
    if document.text is not None:
        return len(document.text)
    if document.token_ids is not None:
        return len(document.token_ids)
    return sum(len(m["content"]) for m in document.messages)


def tokenized(source, encode: Encoder, lengths, lo: int = 0, hi: int | None = None
              ) -> Iterator[tuple[int, Sequence[int]]]:
    """``(prompt_index, token_ids)`` for every prompt of the plan (``lengths``), each cut to its
    planned length (``--max-length``, ``--on-long skip``, the budget); prompts outside ``[lo, hi)``
    are not read (``range(length)`` stands in: batching needs only lengths)."""
    hi = len(lengths) if hi is None else hi
    for index in range(lo):
        yield index, range(int(lengths[index]))
    for documents, ids in encoded_blocks(source.documents(lo, hi), encode):
        for document, token_ids in zip(documents, ids):
            yield document.index, token_ids[:int(lengths[document.index])]
    for index in range(hi, len(lengths)):
        yield index, range(int(lengths[index]))
