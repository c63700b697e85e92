"""Where prompts and documents come from: files of lines, Parquet, saved datasets, compressed or
not, one or many (:func:`open_corpus`), and what their records hold (:class:`Fields`)."""

from .corpus import ENCODING_ERRORS, FORMATS, READERS, STDIN_DISPLAY, STDIN_NAME, Corpus, open_corpus
from .fields import CHAT, MODES, TEXT, TOKENS, Document, Fields

__all__ = ["CHAT", "Corpus", "Document", "ENCODING_ERRORS", "FORMATS", "Fields", "MODES", "READERS",
           "STDIN_DISPLAY", "STDIN_NAME", "TEXT", "TOKENS", "open_corpus"]
