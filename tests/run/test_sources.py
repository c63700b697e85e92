"""Input sources: Parquet, saved datasets, compressed lines, globs and several paths as one stream,
the fields of each record (text, chat, token ids), and the packing of documents into contexts."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gdn_dump.errors import PromptFileError
from gdn_dump.run.packing import count_contexts, pack, pack_reference
from gdn_dump.run.sources import Fields, open_corpus

TEXTS = [f"document {i}: " + "word " * (i % 5 + 1) for i in range(40)]


def write_parquet(path: Path, records: dict, row_group_size: int = 8) -> Path:
    pq.write_table(pa.table(records), path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def error_of(sources, **kwargs) -> str:
    with pytest.raises(PromptFileError) as info:
        corpus = open_corpus(sources, **kwargs)
        list(corpus)
    message = str(info.value)
    assert "\n" not in message
    return message


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- formats -------------------------------------------------------------------------------------


def test_parquet_by_row_groups_with_ids_and_skipping(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", {"text": TEXTS, "id": [f"d{i}" for i in range(40)]})
    corpus = open_corpus(path)
    assert corpus.count == 40 and corpus.format == "parquet"
    assert corpus.provenance()[0]["sha256"] is None  # opening reads metadata only: nothing hashed
    docs = list(corpus)
    assert corpus.provenance()[0]["sha256"] == sha256(path)  # the files read from: their bytes
    assert [d.text for d in docs] == TEXTS and [d.id for d in docs] == [f"d{i}" for i in range(40)]
    assert [d.index for d in docs] == list(range(40)) and docs[5].where == f"{path}, row 6"
    # from any record on (whole row groups skipped by metadata), up to any other
    assert [d.text for d in corpus.documents(13, 30)] == TEXTS[13:30]


def test_saved_dataset_directory(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(40))})
    ds.save_to_disk(str(tmp_path / "ds"), max_shard_size="1KB")  # several .arrow files
    corpus = open_corpus(tmp_path / "ds")
    assert len(corpus.files[0].parts) > 1 and corpus.format == "arrow"
    assert [d.text for d in corpus] == TEXTS
    assert [d.id for d in corpus] == [str(i) for i in range(40)]  # no id field: the row index
    assert [d.text for d in corpus.documents(17)] == TEXTS[17:]
    ds_dict = datasets.DatasetDict({"train": ds})
    ds_dict.save_to_disk(str(tmp_path / "dd"))
    assert "pass one split's directory" in error_of(tmp_path / "dd")


@pytest.mark.parametrize("name", ["p.jsonl.gz", "p.jsonl.zst", "p.jsonl"])
def test_compressed_jsonl(tmp_path, name):
    path = write_jsonl(tmp_path / name, [{"text": t} for t in TEXTS])
    corpus = open_corpus(path)
    assert corpus.format == "jsonl" and corpus.sha256 == sha256(path)  # of the bytes on disk
    assert [d.text for d in corpus] == TEXTS and [d.text for d in corpus.documents(38)] == TEXTS[38:]


def test_txt_gz_and_compressed_stdin_by_magic(tmp_path, monkeypatch):
    import io
    import sys

    data = gzip.compress("\n".join(TEXTS).encode())
    (tmp_path / "p.txt.gz").write_bytes(data)
    assert [d.text for d in open_corpus(tmp_path / "p.txt.gz")] == TEXTS

    class Stdin:
        buffer = io.BytesIO(data)

    monkeypatch.setattr(sys, "stdin", Stdin())
    with open_corpus("-") as corpus:
        assert [d.text for d in corpus] == TEXTS


def test_glob_and_several_paths_are_one_stream(tmp_path):
    write_parquet(tmp_path / "b.parquet", {"text": TEXTS[20:]})
    write_parquet(tmp_path / "a.parquet", {"text": TEXTS[:20]})
    corpus = open_corpus(str(tmp_path / "*.parquet"))
    digest = corpus.sha256
    assert [d.text for d in corpus] == TEXTS  # sorted order
    assert [d.id for d in corpus] == [str(i) for i in range(40)]  # index in the whole stream
    assert [f["path"] for f in corpus.provenance()] == [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    assert [f["sha256"] for f in corpus.provenance()] == [sha256(tmp_path / n) for n in ("a.parquet", "b.parquet")]
    assert [d.text for d in corpus.documents(15, 25)] == TEXTS[15:25]
    write_parquet(tmp_path / "b.parquet", {"text": TEXTS[20:39] + ["changed"]})
    assert open_corpus(str(tmp_path / "*.parquet")).sha256 != digest  # a changed file is seen
    lines = write_jsonl(tmp_path / "c.jsonl", [{"text": "from jsonl"}])
    mixed = open_corpus([str(tmp_path / "*.parquet"), lines])
    assert mixed.count == 41 and list(mixed)[-1].text == "from jsonl" and list(mixed)[-1].id == "40"


def test_chat_and_token_fields(tmp_path):
    chats = [[{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yo"}]
             for i in range(10)]
    path = write_parquet(tmp_path / "c.parquet", {"messages": chats, "ids": [[1, 2, i] for i in range(10)]})
    docs = list(open_corpus(path, fields=Fields(chat=True)))
    assert [list(d.messages) for d in docs] == chats
    docs = list(open_corpus(path, fields=Fields(tokens="ids")))
    assert [list(d.token_ids) for d in docs] == [[1, 2, i] for i in range(10)]


# --- errors --------------------------------------------------------------------------------------


def test_input_errors_are_one_line(tmp_path):
    parquet = write_parquet(tmp_path / "a.parquet", {"body": TEXTS})
    assert "missing field 'text' (the columns are: 'body')" in error_of(parquet)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    assert "not a valid parquet file" in error_of(bad)
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:-20])
    assert "not a valid gz file" in error_of(gz)
    assert "no files match" in error_of(str(tmp_path / "nothing-*.parquet"))
    chats = write_jsonl(tmp_path / "c.jsonl", [{"messages": "not a list"}])
    assert "field 'messages' must be a list of messages" in error_of(chats, fields=Fields(chat=True))
    tokens = write_jsonl(tmp_path / "t.jsonl", [{"input_ids": [1, 2]}, {"input_ids": {"a": 1}}])
    assert f"{tokens}, line 2: field 'input_ids' must be a list of token ids" in error_of(
        tokens, fields=Fields(tokens="input_ids"))
    txt = tmp_path / "p.txt"
    txt.write_text("a\n")
    assert "--chat needs records with fields" in error_of(txt, fields=Fields(chat=True))


# --- packing -------------------------------------------------------------------------------------

documents = st.lists(st.lists(st.integers(0, 99), min_size=1, max_size=30), max_size=25)


@settings(max_examples=60, deadline=None)
@given(documents, st.integers(1, 17))
def test_pack_equals_the_reference_and_count_contexts_finds_each_start(docs, n):
    indexed = list(enumerate(docs))
    reference = pack_reference(indexed, n)
    packed = list(pack(iter(indexed), n))
    assert len(packed) == len(reference)
    for (t, d), (rt, rd) in zip(packed, reference):
        assert np.array_equal(t, rt) and np.array_equal(d, rd)
    starts = count_contexts(((i, len(ids)) for i, ids in indexed), n)
    assert len(starts) == len(reference)
    for k, (doc, offset) in enumerate(zip(starts.documents, starts.offsets)):
        # packing from where context k begins gives context k first
        again = next(pack(iter(indexed[doc:]), n, skip=offset))
        assert np.array_equal(again[0], reference[k][0]) and np.array_equal(again[1], reference[k][1])
    limited = count_contexts(((i, len(ids)) for i, ids in indexed), n, limit=2)
    assert len(limited) == min(2, len(reference))


# --- encoding and counts -------------------------------------------------------------------------


def test_a_tokenizer_without_a_chat_template_is_refused():
    from gdn_dump.errors import GdnDumpError
    from gdn_dump.run.sources import CHAT
    from gdn_dump.run.tokens import Encoder
    from gdn_dump.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(GdnDumpError, match="has no chat template"):
        Encoder(tokenizer, CHAT, model="base-model")


@pytest.mark.parametrize("text, expected", [("50M", 50_000_000), ("2B", 2_000_000_000), ("1.5k", 1500),
                                            ("1e6", 1_000_000), ("1000", 1000), (" 3 G ", 3 * 10**9)])
def test_parse_count(text, expected):
    from gdn_dump.cli.options import parse_count

    assert parse_count(text, "--max-tokens") == expected


@pytest.mark.parametrize("text", ["50Q", "1.5", "-3", "M", "1e"])
def test_parse_count_refuses(text):
    from gdn_dump.cli.options import parse_count

    with pytest.raises(ValueError, match="--max-tokens"):
        parse_count(text, "--max-tokens")
