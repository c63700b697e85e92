"""Tests for gdn_dump.prompts: formats, ids, line numbers, every validation error, stdin, streaming."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import threading
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gdn_dump.run import prompts as prompts_module
from gdn_dump.run.sources import lines as lines_module
from gdn_dump.errors import PromptFileError
from gdn_dump.run.prompts import Prompt, open_prompts


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    """Write a prompt file; str is encoded as UTF-8 without newline translation."""
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def jsonl(*records: object) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def error_of(path: Path | str, **kwargs: object) -> str:
    """The PromptFileError message, checked to be one line that names the file."""
    with pytest.raises(PromptFileError) as info:
        open_prompts(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


class FakeStdin:
    """Stands in for sys.stdin: what matters is the binary .buffer."""

    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


# --- format selection ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [("p.jsonl", "jsonl"), ("p.ndjson", "jsonl"), ("P.JSONL", "jsonl"), ("p.txt", "txt"), ("p.md", "txt"), ("p", "txt")],
)
def test_format_from_extension(tmp_path: Path, name: str, expected: str) -> None:
    path = write(tmp_path, name, '{"text": "hi"}\n')
    assert open_prompts(path).format == expected


def test_format_override(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", '{"text": "hi", "id": "a"}\n')
    source = open_prompts(path, format="jsonl")
    assert source.format == "jsonl"
    assert [(p.id, p.text) for p in source] == [("a", "hi")]
    as_txt = open_prompts(write(tmp_path, "q.jsonl", "plain\n"), format="txt")
    assert [p.text for p in as_txt] == ["plain"]


def test_unknown_format_and_encoding_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "hi\n")
    with pytest.raises(PromptFileError, match="unknown prompt format 'csv'"):
        open_prompts(path, format="csv")
    with pytest.raises(PromptFileError, match="unknown --encoding-errors 'ignore'"):
        open_prompts(path, encoding_errors="ignore")


# --- txt -----------------------------------------------------------------------------------------


def test_txt_lines_ids_and_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "first\n\n   \n\tsecond  \n\nthird")
    source = open_prompts(path)
    assert source.count == len(source) == 3
    assert list(source) == [
        Prompt(index=0, id="0", text="first", line=1),
        Prompt(index=1, id="3", text="\tsecond  ", line=4),  # inner whitespace kept
        Prompt(index=2, id="5", text="third", line=6),  # no final newline
    ]


def test_txt_crlf_and_lone_cr(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "one\r\n\r\ntwo\r\nthree\r")
    assert [(p.text, p.line, p.id) for p in open_prompts(path)] == [
        ("one", 1, "0"),
        ("two", 3, "2"),
        ("three\r", 4, "3"),  # only \n and \r\n end a line
    ]


def test_utf8_bom_is_dropped(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", b"\xef\xbb\xbfhello\nw\xc3\xb6rld\n")
    assert [p.text for p in open_prompts(path)] == ["hello", "wörld"]
    path = write(tmp_path, "p.jsonl", b'\xef\xbb\xbf{"text": "x"}\n')
    assert [p.text for p in open_prompts(path)] == ["x"]


def test_sha256_is_of_raw_bytes(tmp_path: Path) -> None:
    data = b"\xef\xbb\xbfa\r\n\nb"
    path = write(tmp_path, "p.txt", data)
    assert open_prompts(path).sha256 == hashlib.sha256(data).hexdigest()


def test_reiteration_yields_the_same_prompts(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", jsonl({"text": "a"}, {"text": "b", "id": 7}) + "\n" + jsonl({"text": "c"}))
    source = open_prompts(path)
    first = list(source)
    assert first == list(source) == list(source)
    assert [p.index for p in first] == [0, 1, 2]


def test_file_changed_after_open(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "a\nb\n")
    source = open_prompts(path)
    path.write_text("a\nc\n")
    with pytest.raises(PromptFileError, match="changed after it was opened"):
        list(source)
    path.unlink()
    with pytest.raises(PromptFileError, match="disappeared"):
        list(source)


# --- jsonl ---------------------------------------------------------------------------------------


def test_jsonl_ids_text_field_and_blank_lines(tmp_path: Path) -> None:
    data = jsonl({"prompt": "a", "id": 5}, {"prompt": "b", "id": "x"}) + "  \n" + jsonl({"prompt": "c"})
    source = open_prompts(write(tmp_path, "p.jsonl", data), text_field="prompt")
    assert list(source) == [
        Prompt(index=0, id="5", text="a", line=1),
        Prompt(index=1, id="x", text="b", line=2),
        Prompt(index=2, id="3", text="c", line=4),  # default id: 0-based line index
    ]


def test_jsonl_crlf_and_negative_int_id(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", '{"text": "a", "id": -3}\r\n\r\n{"text": "b\\r\\n"}\r\n')
    assert [(p.id, p.text, p.line) for p in open_prompts(path)] == [("-3", "a", 1), ("2", "b\r\n", 3)]


def test_jsonl_whitespace_text_is_kept(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", jsonl({"text": " "}))
    assert [p.text for p in open_prompts(path)] == [" "]


# --- file-level errors ---------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in error_of(tmp_path / "nope.txt")


def test_directory(tmp_path: Path) -> None:
    assert "is a directory" in error_of(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    assert "is empty" in error_of(write(tmp_path, "p.txt", b""))
    assert "is empty" in error_of(write(tmp_path, "p.jsonl", b""))


@pytest.mark.parametrize("name", ["p.txt", "p.jsonl"])
def test_only_blank_lines(tmp_path: Path, name: str) -> None:
    assert "all 3 line(s) are blank" in error_of(write(tmp_path, name, "\n \r\n\t\n"))


def test_line_too_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lines_module, "MAX_LINE_BYTES", 16)
    assert open_prompts(write(tmp_path, "ok.txt", "x" * 15 + "\n")).count == 1
    message = error_of(write(tmp_path, "p.txt", "short\n" + "x" * 40))
    assert "line 2" in message and "longer than 16 bytes" in message


# --- encoding ------------------------------------------------------------------------------------


def test_invalid_utf8_strict(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "p.txt", b"ok\nab\xffc\n"))
    assert "line 2" in message and "0xff" in message and "column 3" in message
    assert "--encoding-errors replace" in message


def test_invalid_utf8_replace(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", b"ok\nab\xffc\n\xfe\n\n")
    source = open_prompts(path, encoding_errors="replace")
    assert source.replaced_lines == 2
    assert [p.text for p in source] == ["ok", "ab\ufffdc", "\ufffd"]
    assert open_prompts(write(tmp_path, "clean.txt", "ok\n"), encoding_errors="replace").replaced_lines == 0


def test_invalid_utf8_in_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", b'{"text": "a\xe9"}\n')
    assert "line 1" in error_of(path)
    assert [p.text for p in open_prompts(path, encoding_errors="replace")] == ["a\ufffd"]


# --- jsonl line errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"text": "a",}', "invalid JSON"),
        ("not json", "invalid JSON"),
        ("[" * 100_000 + "]" * 100_000, "invalid JSON"),
        ('{"text": ' + "1" * 5000 + "}", "invalid JSON"),
        ('["a"]', "expected a JSON object, got an array"),
        ('"text"', "expected a JSON object, got a string"),
        ("3", "expected a JSON object, got a number"),
        ("null", "expected a JSON object, got null"),
        ('{"text": 3}', "field 'text' must be a string, got a number"),
        ('{"text": null}', "field 'text' must be a string, got null"),
        ('{"text": ["a"]}', "field 'text' must be a string, got an array"),
        ('{"text": ""}', "field 'text' is an empty string"),
        ('{"text": "a", "id": 1.5}', "field 'id' must be a string or an integer, got a number"),
        ('{"text": "a", "id": true}', "field 'id' must be a string or an integer, got a boolean"),
        ('{"text": "a", "id": null}', "field 'id' must be a string or an integer, got null"),
        ('{"text": "a", "id": [1]}', "field 'id' must be a string or an integer, got an array"),
        ('{"text": "a\\ud800"}', "field 'text' contains an unpaired surrogate \\ud800"),
        ('{"text": "a", "id": "\\udfff"}', "field 'id' contains an unpaired surrogate \\udfff"),
        ("{}", "missing field 'text' (the line is an empty object)"),
    ],
)
def test_bad_jsonl_line(tmp_path: Path, line: str, expected: str) -> None:
    path = write(tmp_path, "p.jsonl", jsonl({"text": "fine"}) + "\n" + line + "\n")
    message = error_of(path)
    assert "line 3" in message
    assert expected in message


def test_missing_text_field_names_field_and_lists_fields(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", jsonl({"prompt": "a", "id": 1}))
    message = error_of(path)
    assert "line 1: missing field 'text' (the line has fields: 'prompt', 'id')" in message
    path = write(tmp_path, "q.jsonl", jsonl({"prompt": "a"}))
    assert "missing field 'body'" in error_of(path, text_field="body")


def test_missing_text_field_list_is_truncated(tmp_path: Path) -> None:
    record = {f"field_{i}": i for i in range(50)}
    record["x" * 500] = 1
    message = error_of(write(tmp_path, "p.jsonl", jsonl(record)))
    assert "'field_0', 'field_1', 'field_2', 'field_3', 'field_4', ... (46 more)" in message
    assert len(message) < 300


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([{"text": "a", "id": "x"}, {"text": "b"}, {"text": "c", "id": "x"}], "line 3: duplicate id 'x' (first used on line 1)"),
        ([{"text": "a", "id": 1}, {"text": "b", "id": "1"}], "line 2: duplicate id '1' (first used on line 1)"),
        ([{"text": "a"}, {"text": "b", "id": "0"}], "line 2: duplicate id '0' (first used on line 1)"),
        ([{"text": "a", "id": "1"}, {"text": "b"}], "line 2: duplicate id '1' (first used on line 1)"),
    ],
)
def test_duplicate_ids(tmp_path: Path, records: list[dict[str, object]], expected: str) -> None:
    assert expected in error_of(write(tmp_path, "p.jsonl", jsonl(*records)))


def test_duplicate_id_reports_earliest_repeat(tmp_path: Path) -> None:
    records = [{"text": "t", "id": i} for i in "abcdeb" + "a"]
    assert "line 6: duplicate id 'b' (first used on line 2)" in error_of(write(tmp_path, "p.jsonl", jsonl(*records)))


def test_hash_collisions_are_not_duplicates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every id hashing alike must still only fail on real repeats."""
    monkeypatch.setattr(prompts_module, "_id_hash", lambda _id: 42)
    path = write(tmp_path, "p.jsonl", jsonl(*({"text": "t", "id": str(i)} for i in range(20))))
    assert open_prompts(path).count == 20
    path = write(tmp_path, "q.jsonl", jsonl(*({"text": "t", "id": i % 7} for i in range(20))))
    assert "line 8: duplicate id '0' (first used on line 1)" in error_of(path)


def test_txt_may_contain_json_lookalike_duplicates(tmp_path: Path) -> None:
    """txt ids are line indices, so identical lines are fine."""
    assert open_prompts(write(tmp_path, "p.txt", "same\nsame\n")).count == 2


# --- stdin and pipes -----------------------------------------------------------------------------


@pytest.fixture
def spool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Send spool files to a private folder so tests can see them come and go."""
    folder = tmp_path / "spool"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_stdin_is_spooled_and_rereadable(spool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"a\r\n\nb\n"
    monkeypatch.setattr(sys, "stdin", FakeStdin(data))
    source = open_prompts("-")
    assert source.display == "<stdin>" and source.format == "txt"
    assert source.path.parent == spool_dir and source.path.read_bytes() == data
    assert source.sha256 == hashlib.sha256(data).hexdigest()
    assert [(p.id, p.text) for p in source] == [("0", "a"), ("2", "b")]
    assert list(source) == list(source)
    source.close()
    source.close()
    assert not source.path.exists()


def test_stdin_jsonl_and_context_manager(spool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(jsonl({"text": "x", "id": 3}).encode()))
    with open_prompts(Path("-"), format="jsonl") as source:
        assert [(p.id, p.text) for p in source] == [("3", "x")]
        spooled = source.path
    assert not spooled.exists()
    assert list(spool_dir.iterdir()) == []


def test_stdin_error_removes_spool(spool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(b"\xff\n"))
    with pytest.raises(PromptFileError, match=r"^<stdin>, line 1: invalid UTF-8"):
        open_prompts("-")
    monkeypatch.setattr(sys, "stdin", FakeStdin(b""))
    with pytest.raises(PromptFileError, match=r"^<stdin>: the file is empty"):
        open_prompts("-")
    assert list(spool_dir.iterdir()) == []


def test_stdin_without_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(PromptFileError, match="standard input"):
        open_prompts("-")


def test_spool_removed_when_source_is_dropped(spool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(b"a\n"))
    source = open_prompts("-")
    spooled = source.path
    del source
    assert not spooled.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_is_spooled(tmp_path: Path, spool_dir: Path) -> None:
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(jsonl({"text": "piped"}).encode()))
    writer.start()
    with open_prompts(fifo) as source:
        writer.join()
        assert source.format == "jsonl" and source.display == str(fifo)
        assert [p.text for p in source] == [p.text for p in source] == ["piped"]
    assert list(spool_dir.iterdir()) == []


# --- memory --------------------------------------------------------------------------------------


def test_reading_is_streamed_not_loaded(tmp_path: Path) -> None:
    """Peak memory while validating and iterating stays far below the file size."""
    line = "x" * 200 + "\n"
    path = write(tmp_path, "big.txt", line * 20_000)  # ~4 MB
    tracemalloc.start()
    try:
        source = open_prompts(path)
        count = sum(1 for _ in source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == source.count == 20_000
    assert peak < 512 * 1024


# --- property tests ------------------------------------------------------------------------------

PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
json_records = st.dictionaries(
    st.sampled_from(["text", "id", "prompt", "meta"]) | st.text(max_size=5), json_values, max_size=4
)
# Mostly-valid records, so the property also covers files that open (ids may still collide).
good_records = st.fixed_dictionaries(
    {"text": st.text(min_size=1, max_size=20)},
    optional={"id": st.integers(-3, 3) | st.text(max_size=2), "meta": json_values},
)


def check_reads_or_fails_cleanly(name: str, data: bytes, **kwargs: object) -> None:
    """The contract: either a usable source whose iteration yields `count` prompts, or PromptFileError."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        try:
            source = open_prompts(path, **kwargs)
        except PromptFileError as exc:
            assert "\n" not in str(exc)
            return
        with source:
            items = list(source)
            assert len(items) == source.count > 0
            assert [p.index for p in items] == list(range(source.count))
            assert len({p.id for p in items}) == source.count
            assert all(p.text.strip() if source.format == "txt" else p.text for p in items)
            assert source.sha256 == hashlib.sha256(data).hexdigest()


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=300), errors=st.sampled_from(["strict", "replace"]))
def test_property_arbitrary_bytes_as_txt(data: bytes, errors: str) -> None:
    check_reads_or_fails_cleanly("p.txt", data, encoding_errors=errors)


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=300), errors=st.sampled_from(["strict", "replace"]))
def test_property_arbitrary_bytes_as_jsonl(data: bytes, errors: str) -> None:
    check_reads_or_fails_cleanly("p.jsonl", data, encoding_errors=errors)


@PROPERTY_SETTINGS
@given(
    records=st.lists(good_records | json_records | json_values, max_size=6),
    blank_between=st.booleans(),
    newline=st.sampled_from(["\n", "\r\n"]),
)
def test_property_jsonish_dicts_as_jsonl(records: list[object], blank_between: bool, newline: str) -> None:
    separator = newline + (newline if blank_between else "")
    data = separator.join(json.dumps(record) for record in records).encode("utf-8")
    check_reads_or_fails_cleanly("p.jsonl", data)


@PROPERTY_SETTINGS
@given(lines=st.lists(st.text(max_size=40), max_size=8), text_field=st.sampled_from(["text", "id", ""]))
def test_property_text_lines_as_jsonl(lines: list[str], text_field: str) -> None:
    data = "\n".join(lines).encode("utf-8")
    check_reads_or_fails_cleanly("p.jsonl", data, text_field=text_field, encoding_errors="replace")


@PROPERTY_SETTINGS
@given(lines=st.lists(st.text(max_size=40), min_size=1, max_size=8))
def test_property_txt_round_trip(lines: list[str]) -> None:
    """Clean text lines come back exactly, with ids equal to their line index."""
    lines = [line.replace("\n", " ").replace("\r", " ") for line in lines]
    assume(not lines[0].startswith("\ufeff"))  # a leading BOM is dropped on purpose
    data = "\n".join(lines).encode("utf-8")
    expected = [(str(i), line) for i, line in enumerate(lines) if line.strip()]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.txt"
        path.write_bytes(data)
        if not expected:
            with pytest.raises(PromptFileError):
                open_prompts(path)
            return
        assert [(p.id, p.text) for p in open_prompts(path)] == expected
