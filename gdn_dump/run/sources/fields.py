"""What a record of the input holds, and how to say where it went wrong.

Every tabular format (jsonl, Parquet, a saved ``datasets`` directory) yields records as dicts;
:class:`Fields` turns one into the document it holds (text, a chat, or token ids) and its id, with
one precise :class:`~gdn_dump.errors.PromptFileError` line for each way it can be wrong. A ``.txt``
line is a text document by itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import PromptFileError

TEXT, CHAT, TOKENS = "text", "chat", "tokens"  # what a record holds: --text-field, --chat, --tokens-field
MODES = (TEXT, CHAT, TOKENS)

_MAX_SHOWN_FIELDS = 5
_MAX_SHOWN_CHARS = 40


@dataclass(frozen=True, slots=True)
class Document:
    """One record of the input stream, as a prompt (unpacked) or a document (packed)."""

    index: int  #: 0-based position in the whole stream (files in order)
    id: str  #: the id field (ints turned to text), else the 0-based line or row index in the stream
    text: str | None = None
    line: int = 0  #: 1-based line (line formats) or row (tabular) within its file
    #: the file it came from, as the user named it (where it is, not what it is: not compared)
    file: str = field(default="", compare=False)
    messages: tuple | None = None  #: ({"role", "content"}, ...) with --chat
    token_ids: tuple[int, ...] | None = None  #: with --tokens-field
    unit: str = field(default="line", compare=False)  #: "line" or "row": what ``line`` counts

    @property
    def where(self) -> str:
        """``p.jsonl, line 4`` / ``web/b.parquet, row 17``: where the document is, for errors."""
        return f"{self.file}, {self.unit} {self.line}"


@dataclass(frozen=True, slots=True)
class Fields:
    """Which fields of a record matter: ``--text-field``, ``--id-field``, ``--chat`` with
    ``--messages-field``, ``--tokens-field``."""

    text: str = "text"
    id: str = "id"
    messages: str = "messages"
    tokens: str | None = None
    chat: bool = False

    @property
    def mode(self) -> str:
        return TOKENS if self.tokens else CHAT if self.chat else TEXT

    @property
    def content(self) -> str:
        """The field that holds the document."""
        return {TEXT: self.text, CHAT: self.messages, TOKENS: self.tokens}[self.mode]

    def check(self) -> None:
        if self.tokens is not None and self.chat:
            raise PromptFileError("--chat and --tokens-field exclude each other (a record holds "
                                  "either a conversation or token ids)")

    def document(self, record: dict[str, Any], index: int, line: int, file: str, unit: str,
                 default_id: str) -> Document:
        """The document of one record (a dict), checked field by field."""
        where = f"{file}, {unit} {line}"
        field = self.content
        if field not in record:
            raise PromptFileError(f"{where}: missing field {short(field)} ({describe_fields(record, unit)})")
        value = record[field]
        doc_id = self._id(record, where, default_id, null_is_missing=unit == "row")
        base = dict(index=index, id=doc_id, line=line, file=file, unit=unit)
        mode = self.mode
        if mode == TEXT:
            return Document(text=_text(value, where, field), **base)
        if mode == CHAT:
            return Document(messages=_messages(value, where, field), **base)
        return Document(token_ids=_token_ids(value, where, field), **base)

    def _id(self, record: dict[str, Any], where: str, default: str, null_is_missing: bool) -> str:
        """The record's id as text; ints are accepted (bools are not, though Python thinks they
        are ints). A null in a table's id column is a missing id; in JSON it was written."""
        if self.id not in record or (null_is_missing and record[self.id] is None):
            return default
        value = record[self.id]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise PromptFileError(f"{where}: field {short(self.id)} must be a string or an integer, "
                                  f"got {json_type(value)}")
        if isinstance(value, int):
            return str(value)
        check_encodable(value, f"{where}: field {short(self.id)}")
        return value


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise PromptFileError(f"{where}: field {short(field)} must be a string, got {json_type(value)}")
    if not value:
        raise PromptFileError(f"{where}: field {short(field)} is an empty string")
    check_encodable(value, f"{where}: field {short(field)}")
    return value


def _messages(value: Any, where: str, field: str) -> tuple:
    """A conversation: a non-empty list of ``{"role": str, "content": str}``."""
    value = _nonempty_list(value, where, field, 'messages ({"role", "content"})')
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise PromptFileError(f"{where}: message {i} of {short(field)} must be an object with "
                                  f"\"role\" and \"content\", got {json_type(message)}"
                                  + (f" with fields {', '.join(map(short, message))}"
                                     if isinstance(message, dict) else ""))
        for key in ("role", "content"):
            if not isinstance(message[key], str):
                raise PromptFileError(f"{where}: message {i} of {short(field)}: {key!r} must be a "
                                      f"string, got {json_type(message[key])}")
            check_encodable(message[key], f"{where}: message {i} of {short(field)}")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _token_ids(value: Any, where: str, field: str) -> tuple[int, ...]:
    """Token ids as given: a non-empty list of non-negative ints (the vocabulary is checked where
    they are encoded, :class:`gdn_dump.run.tokens.Encoder`)."""
    value = _nonempty_list(value, where, field, "token ids")
    for i, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise PromptFileError(f"{where}: field {short(field)}[{i}] must be a token id "
                                  f"(an integer >= 0), got {token!r:.40}")
    return tuple(value)


def _nonempty_list(value: Any, where: str, field: str, what: str) -> list:
    """``value`` as a list (Arrow gives lists already; a numpy array, from some writers, becomes
    one), refused when it is not a list or is empty."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if not isinstance(value, list):
        raise PromptFileError(f"{where}: field {short(field)} must be a list of {what}, "
                              f"got {json_type(value)}")
    if not value:
        raise PromptFileError(f"{where}: field {short(field)} is an empty list")
    return value


# --- message helpers ---------------------------------------------------------------------------


def check_encodable(value: str, what: str) -> None:
    """JSON allows lone surrogate escapes ("\\ud800") that no tokenizer or store can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptFileError(
            f"{what} contains an unpaired surrogate \\u{ord(value[exc.start]):04x}"
        ) from None


def json_type(value: object) -> str:
    """Name a parsed value by its JSON type, which is what the user wrote."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def describe_fields(record: dict[str, Any], unit: str = "line") -> str:
    """List a record's fields, truncated, so the user sees what the field is really called."""
    if not record:
        return f"the {unit} is an empty object"
    names = [short(name) for name in list(record)[:_MAX_SHOWN_FIELDS]]
    more = len(record) - len(names)
    suffix = f", ... ({more} more)" if more else ""
    return f"the {unit} has fields: {', '.join(names)}{suffix}"


def short(value: str) -> str:
    """repr() of a user string, cut short: keeps messages on one line and of sane length."""
    if len(value) > _MAX_SHOWN_CHARS:
        return repr(value[:_MAX_SHOWN_CHARS]) + "..."
    return repr(value)


def one_line(message: str) -> str:
    """Collapse a library message onto one line."""
    return " ".join(message.split())
