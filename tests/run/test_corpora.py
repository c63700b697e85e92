"""extract over real corpora: every input mode stores exactly the tokens an independent
computation gives (the tokenizer called directly, apply_chat_template, the documented packing),
rows equal run_with_cache of each stored prompt alone, row_document points every row to its
document, budgets, several processes, resume, and bounded memory on a large Parquet file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.packing import pack_reference
from gdn_dump.run.pipeline import extract

from ..helpers import kill_at, Killed

HOOK = "blocks.0.linear_attn.hook_beta"
HOOKS = "beta,v"
WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta"]


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 12)))) for _ in range(n)]


def run(tiny, prompts, out, **kw):
    kw.setdefault("hooks", HOOKS)
    return extract(ExtractOptions(model="tiny", prompts=prompts, out=str(out), dtype="float32", **kw),
                   model=tiny)


def stored(out):
    group = zarr.open_group(str(out), mode="r")
    starts, lengths = group["prompt_start"][:], group["prompt_length"][:]
    tokens = group["tokens"][:]
    return group, [tokens[s:s + n] for s, n in zip(starts, lengths)], [slice(s, s + n) for s, n in zip(starts, lengths)]


def assert_rows_equal_run_with_cache(tiny, group, token_lists, rows, names=(HOOK,)):
    """Each stored prompt's rows equal run_with_cache of its token ids alone."""
    for tokens, where in zip(token_lists, rows):
        if not len(tokens):
            continue
        with torch.inference_mode():
            _, cache = tiny.bridge.run_with_cache(torch.tensor([tokens.tolist()]), use_cache=False)
        for name in names:
            np.testing.assert_allclose(group[name][where], cache[name][0].float().numpy(),
                                       rtol=1e-5, atol=1e-6)


def eos(tiny) -> int:
    return tiny.tokenizer.eos_token_id


@pytest.fixture()
def parquet_corpus(tmp_path):
    docs = texts(120)
    path = tmp_path / "web-000.parquet"
    pq.write_table(pa.table({"text": docs, "id": [f"doc{i}" for i in range(120)]}), path,
                   row_group_size=16)
    return path, docs


# --- one mode each ------------------------------------------------------------------------------


def test_parquet_prompts_equal_the_tokenizer_and_run_with_cache(tiny, parquet_corpus, tmp_path):
    path, docs = parquet_corpus
    run(tiny, str(path), tmp_path / "s.zarr")
    group, token_lists, rows = stored(tmp_path / "s.zarr")
    expected = tiny.tokenizer(docs)["input_ids"]
    assert [t.tolist() for t in token_lists] == expected
    assert list(group["prompt_id"][:]) == [f"doc{i}" for i in range(120)]
    meta = group.attrs["gdn_dump"]
    assert meta["prompts"]["files"][0]["records"] == 120 and meta["prompts"]["format"] == "parquet"
    assert_rows_equal_run_with_cache(tiny, group, token_lists[:6], rows[:6], names=(HOOK, "blocks.1.linear_attn.hook_v"))


def test_saved_dataset_and_compressed_jsonl_glob(tiny, tmp_path):
    import datasets
    import gzip

    docs = texts(30, seed=1)
    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(tmp_path / "ds"))
    run(tiny, str(tmp_path / "ds"), tmp_path / "a.zarr", text_field="content")
    _, token_lists, _ = stored(tmp_path / "a.zarr")
    assert [t.tolist() for t in token_lists] == tiny.tokenizer(docs)["input_ids"]
    for i, part in enumerate((docs[:10], docs[10:])):
        (tmp_path / f"p{i}.jsonl.gz").write_bytes(gzip.compress(
            "".join(json.dumps({"text": t}) + "\n" for t in part).encode()))
    run(tiny, str(tmp_path / "p*.jsonl.gz"), tmp_path / "b.zarr")
    group, token_lists, _ = stored(tmp_path / "b.zarr")
    assert [t.tolist() for t in token_lists] == tiny.tokenizer(docs)["input_ids"]
    assert list(group["prompt_id"][:]) == [str(i) for i in range(30)]  # line index in the stream
    assert len(group.attrs["gdn_dump"]["prompts"]["files"]) == 2


@pytest.mark.parametrize("name", ["p.txt.gz", "p.jsonl.zst", "p.ndjson"])
def test_line_formats_compressed_or_not(tiny, tmp_path, name):
    import gzip

    import zstandard

    docs = texts(12, seed=3)
    if ".txt" in name:
        data = "\n".join(docs).encode()
    else:
        data = "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()
    compress = {".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress}.get(
        name[name.rfind("."):], lambda b: b)
    (tmp_path / name).write_bytes(compress(data))
    run(tiny, str(tmp_path / name), tmp_path / "s.zarr")
    group, token_lists, rows = stored(tmp_path / "s.zarr")
    assert [t.tolist() for t in token_lists] == tiny.tokenizer(docs)["input_ids"]
    assert_rows_equal_run_with_cache(tiny, group, token_lists[:2], rows[:2])


def test_chat_equals_apply_chat_template(tiny, tmp_path):
    chats = [[{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}]
             for t in texts(8, seed=2)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    run(tiny, str(path), tmp_path / "c.zarr", chat=True, add_generation_prompt=True)
    group, token_lists, rows = stored(tmp_path / "c.zarr")
    for tokens, messages in zip(token_lists, chats):
        ids = tiny.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        assert tokens.tolist() == list(ids)
    assert_rows_equal_run_with_cache(tiny, group, token_lists[:3], rows[:3])


def test_token_ids_are_used_as_given(tiny, tmp_path):
    ids = [[5, 6, 7], [200, 1, 2, 3, 4], [9]]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"input_ids": ids}), path)
    run(tiny, str(path), tmp_path / "t.zarr", tokens_field="input_ids")
    group, token_lists, rows = stored(tmp_path / "t.zarr")
    assert [t.tolist() for t in token_lists] == ids  # no special tokens added
    assert_rows_equal_run_with_cache(tiny, group, token_lists, rows)


# --- packing and budgets --------------------------------------------------------------------------


def packed_reference(tiny, docs, n):
    encoded = [(i, tiny.tokenizer(t, add_special_tokens=False)["input_ids"] + [eos(tiny)])
               for i, t in enumerate(docs)]
    return pack_reference(encoded, n)


def test_packing_cuts_the_documented_contexts_and_row_document(tiny, parquet_corpus, tmp_path):
    path, docs = parquet_corpus
    result = run(tiny, str(path), tmp_path / "p.zarr", context_size=48)
    group, token_lists, rows = stored(tmp_path / "p.zarr")
    reference = packed_reference(tiny, docs, 48)
    assert len(token_lists) == len(reference) == result.plan.n_prompts
    row_document = group["row_document"][:]
    for (tokens, where), (ref_tokens, ref_docs) in zip(zip(token_lists, rows), reference):
        assert np.array_equal(tokens, ref_tokens) and np.array_equal(row_document[where], ref_docs)
    assert list(group["prompt_id"][:3]) == ["ctx-0", "ctx-1", "ctx-2"]
    from gdn_dump import open_store

    opened = open_store(str(tmp_path / "p.zarr"))
    assert np.array_equal(opened.prompt(2).documents, reference[2][1])
    # every row's document holds that row's token, in order (the EOS ends its own document)
    for doc in np.unique(row_document):
        ids = tiny.tokenizer(docs[doc], add_special_tokens=False)["input_ids"] + [eos(tiny)]
        mine = group["tokens"][:][row_document == doc]
        assert "".join(map(chr, mine)) in "".join(map(chr, ids))
    packing = group.attrs["gdn_dump"]["packing"]
    total = sum(len(tiny.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in docs)
    assert packing["context_size"] == 48 and packing["separator"] == eos(tiny)
    assert packing["dropped_tokens"] == total - 48 * len(reference)  # the final partial context
    assert_rows_equal_run_with_cache(tiny, group, token_lists[:4], rows[:4])
    from gdn_dump.store.verify import verify_store

    assert all(c.ok for c in verify_store(str(tmp_path / "p.zarr")))


def test_budgets(tiny, parquet_corpus, tmp_path):
    path, docs = parquet_corpus
    run(tiny, str(path), tmp_path / "b.zarr", max_tokens=100)
    group, token_lists, _ = stored(tmp_path / "b.zarr")
    expected, total = [], 0
    for ids in tiny.tokenizer(docs)["input_ids"]:
        expected.append(ids[:100 - total])
        total += len(expected[-1])
        if total == 100:
            break
    assert [t.tolist() for t in token_lists] == expected and sum(map(len, token_lists)) == 100
    run(tiny, str(path), tmp_path / "pb.zarr", context_size=32, max_tokens=200)
    _, packed, _ = stored(tmp_path / "pb.zarr")
    reference = packed_reference(tiny, docs, 32)[:200 // 32]
    assert [t.tolist() for t in packed] == [t.tolist() for t, _ in reference]


# --- several processes ---------------------------------------------------------------------------


def test_two_shards_on_a_packed_parquet_corpus_with_a_budget(tiny, parquet_corpus, tmp_path):
    """Each process packs its own half of the documents into its region: the store is complete,
    no document is in it twice, none is skipped inside a process's documents, and two runs with
    the same number of processes give the same store."""
    path, docs = parquet_corpus
    n, budget = 32, 32 * 20
    stores = []
    for attempt in ("a", "b"):
        out = tmp_path / f"{attempt}.zarr"
        for shard in ("0/2", "1/2"):  # units of a batch each (no sorting window): cut points
            run(tiny, str(path), out, context_size=n, max_tokens=budget, shard=shard,
                sort_window_bytes=0, batch_size=4)
        stores.append(out)
    group, token_lists, rows = stored(stores[0])
    assert group.attrs["gdn_dump"]["status"] == "complete" and len(token_lists) == 20
    ranges = group.attrs["gdn_dump"]["packing"]["document_ranges"]
    assert ranges == [[0, 60], [60, 120]]
    regions = group.attrs["gdn_dump"]["processes"]["regions"]
    row_document = group["row_document"][:]
    seen = []
    for (lo, hi), (first_doc, last_doc) in zip(regions, ranges):
        region_docs = np.concatenate([row_document[rows[k]] for k in range(lo, hi)])
        region_tokens = np.concatenate([token_lists[k] for k in range(lo, hi)])
        # exactly the packing of this process's documents, from its first one on
        reference = packed_reference(tiny, docs[first_doc:last_doc], n)[:hi - lo]
        assert np.array_equal(region_tokens, np.concatenate([t for t, _ in reference]))
        assert np.array_equal(region_docs, np.concatenate([d for _, d in reference]) + first_doc)
        used = np.unique(region_docs)
        assert used.tolist() == list(range(first_doc, first_doc + len(used)))  # none skipped
        seen.extend(used.tolist())
    assert len(seen) == len(set(seen))  # no document twice
    other, other_tokens, _ = stored(stores[1])
    assert all(np.array_equal(a, b) for a, b in zip(token_lists, other_tokens))
    assert np.array_equal(other["row_document"][:], row_document)
    assert np.array_equal(other[HOOK][:], group[HOOK][:])
    assert_rows_equal_run_with_cache(tiny, group, [token_lists[0], token_lists[-1]], [rows[0], rows[-1]])


def test_one_stream_is_the_same_for_any_number_of_processes(tiny, parquet_corpus, tmp_path):
    path, _ = parquet_corpus
    run(tiny, str(path), tmp_path / "one.zarr", context_size=40)
    for shard in ("0/2", "1/2"):
        run(tiny, str(path), tmp_path / "two.zarr", context_size=40, shard=shard,
            sort_window_bytes=0, batch_size=4)
    assert all(hi > lo for lo, hi in zarr.open_group(str(tmp_path / "two.zarr")).attrs["gdn_dump"]["processes"]["regions"])
    one, a, _ = stored(tmp_path / "one.zarr")
    two, b, _ = stored(tmp_path / "two.zarr")
    assert [t.tolist() for t in a] == [t.tolist() for t in b]
    rows_a = np.concatenate([one["row_document"][s:s + 40] for s in one["prompt_start"][:]])
    rows_b = np.concatenate([two["row_document"][s:s + 40] for s in two["prompt_start"][:]])
    assert np.array_equal(rows_a, rows_b)


def test_a_killed_packed_run_resumes_to_the_same_store(tiny, parquet_corpus, tmp_path, monkeypatch):
    path, _ = parquet_corpus
    options = dict(context_size=64, batch_size=4, checkpoint_every=0.0)
    ref = run(tiny, str(path), tmp_path / "ref.zarr", **options)
    with monkeypatch.context() as m:
        kill_at(m, "after-checkpoint:3")
        with pytest.raises(Killed):
            run(tiny, str(path), tmp_path / "r.zarr", **options)
    resumed = run(tiny, str(path), tmp_path / "r.zarr", resume=True, **options)
    assert 0 < resumed.prompts < ref.plan.n_prompts  # it went on from the checkpoint
    ref, ref_tokens, _ = stored(tmp_path / "ref.zarr")
    got, got_tokens, _ = stored(tmp_path / "r.zarr")
    assert got.attrs["gdn_dump"]["status"] == "complete"
    for name in ("tokens", "row_document", HOOK):
        assert np.array_equal(ref[name][:], got[name][:]), name


def test_a_killed_shard_of_a_budgeted_packed_run_resumes(tiny, parquet_corpus, tmp_path, monkeypatch):
    path, _ = parquet_corpus
    options = dict(context_size=32, max_tokens=32 * 24, batch_size=2, checkpoint_every=0.0)
    for shard in ("0/2", "1/2"):
        run(tiny, str(path), tmp_path / "ref.zarr", shard=shard, **options)
    run(tiny, str(path), tmp_path / "r.zarr", shard="0/2", **options)
    with monkeypatch.context() as m:
        kill_at(m, "after-checkpoint:2")
        with pytest.raises(Killed):
            run(tiny, str(path), tmp_path / "r.zarr", shard="1/2", **options)
    resumed = run(tiny, str(path), tmp_path / "r.zarr", shard="1/2", resume=True, **options)
    assert 0 < resumed.prompts < 12
    ref, got = zarr.open_group(str(tmp_path / "ref.zarr")), zarr.open_group(str(tmp_path / "r.zarr"))
    assert got.attrs["gdn_dump"]["status"] == "complete"
    for name in ("tokens", "row_document", HOOK):
        assert np.array_equal(ref[name][:], got[name][:]), name


# --- memory --------------------------------------------------------------------------------------

READ_ALL = textwrap.dedent("""
    import sys
    from gdn_dump.run.sources import open_corpus
    n = sum(len(d.text) for d in open_corpus(sys.argv[1]))
    # VmHWM, not ru_maxrss: an exec'd child's ru_maxrss starts at the forking parent's peak
    print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0], n)
""")


def test_a_large_parquet_file_is_read_in_bounded_memory(tmp_path):
    """Peak RSS reading every record of a ~100 MB file stays within a few MiB of reading a
    file a tenth of its size: row groups are read one batch at a time."""
    rng = np.random.default_rng(0)
    block = [bytes(r).decode() for r in rng.integers(97, 123, size=(5000, 1000), dtype=np.uint8)]
    peaks = {}
    for name, rows in (("small", 10_000), ("large", 100_000)):
        path = tmp_path / f"{name}.parquet"
        writer = pq.ParquetWriter(path, pa.schema([("text", pa.string())]), compression="none",
                                  use_dictionary=False)
        for _ in range(rows // 5000):
            writer.write_table(pa.table({"text": block}), row_group_size=2000)
        writer.close()
        out = subprocess.run([sys.executable, "-c", READ_ALL, str(path)], capture_output=True,
                             text=True, check=True).stdout.split()
        peaks[name] = int(out[0]) * 1024
        assert int(out[1]) == rows * 1000
    assert (tmp_path / "large.parquet").stat().st_size > 95 * 2**20
    assert peaks["large"] - peaks["small"] < 16 * 2**20, peaks  # 86 MiB more of file


def test_a_large_saved_dataset_is_read_in_bounded_memory(tmp_path):
    """The same for a save_to_disk directory: its Arrow stream is read a batch at a time."""
    import datasets

    rng = np.random.default_rng(0)
    block = [bytes(r).decode() for r in rng.integers(97, 123, size=(5000, 1000), dtype=np.uint8)]
    peaks = {}
    for name, copies in (("small", 2), ("large", 20)):
        datasets.Dataset.from_dict({"text": block * copies}).save_to_disk(str(tmp_path / name))
        out = subprocess.run([sys.executable, "-c", READ_ALL, str(tmp_path / name)],
                             capture_output=True, text=True, check=True).stdout.split()
        peaks[name] = int(out[0]) * 1024
        assert int(out[1]) == copies * 5000 * 1000
    assert peaks["large"] - peaks["small"] < 16 * 2**20, peaks  # 86 MiB more of data
