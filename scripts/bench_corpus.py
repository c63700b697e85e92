"""Corpora in (issue 15): what the plan of a packed Parquet corpus costs, one process vs shards.

A Parquet corpus of about ``--tokens`` tokens (default 1M) of the built-in ``tiny`` tokenizer
(byte-level: a token a byte), documents of 20-400 random words, row groups of 256 rows, is
planned (``extract --dry-run``: the corpus opened, every document the plan needs read and
tokenized, the store laid out) side by side in one run by:

- ``bare_tokenizer``: the ceiling: the tokenizer called directly on every document (blocks of 512,
  as the plan does), after the texts were read into memory;
- ``one_process``: ``--context-size 1024`` alone: the whole corpus is read and tokenized once;
- ``one_process_budget``: the same with ``--max-tokens`` half the corpus: reading stops there;
- ``shard_0/2``, ``shard_1/2``: ``--shard i/2`` with that budget: each process reads its own
  range of documents, until its region of the budget is full.

Each contender is timed ``--repeats`` times (the median reported). Per contender: plan seconds,
documents and tokens read, the fraction of the corpus read (documents), tokens/s of the plan
(tokens read / plan seconds), and the plan's time over one_process. Opening the corpus reads
Parquet metadata only; the sha256 of a file's bytes (for provenance) is computed by a process that
read documents from it, and is printed apart. Run::

    python scripts/bench_corpus.py [--tokens 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gdn_dump.model.tiny import build_tiny_tokenizer
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract
from gdn_dump.run.sources import tabular
from gdn_dump.run.tokens import TOKENIZE_BLOCK

CONTEXT = 1024
WORDS = ["the", "of", "and", "gated", "delta", "rule", "state", "decay", "write", "strength",
         "attention", "linear", "token", "model", "layer", "value", "query", "key"]


def make_corpus(path: Path, tokens: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < tokens:
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(20, 400))))
        docs.append(text)
        total += len(text) + 1  # byte-level tokens + EOS
    pq.write_table(pa.table({"text": docs}), path, row_group_size=256)
    return docs


class Counter:
    """Counts the documents the Parquet reader hands out (what a process read and decoded)."""

    def __init__(self):
        self.documents = self.characters = 0
        self._original = tabular.TableFile.documents

    def __enter__(self):
        counter, original = self, self._original

        def documents(file, *args, **kwargs):
            for doc in original(file, *args, **kwargs):
                counter.documents += 1
                counter.characters += len(doc.text) + 1
                yield doc

        tabular.TableFile.documents = documents
        return self

    def __exit__(self, *exc):
        tabular.TableFile.documents = self._original


def plan_once(corpus: Path, out: Path, **options) -> dict:
    with Counter() as counter:
        start = time.perf_counter()
        result = extract(ExtractOptions(model="tiny", prompts=str(corpus), out=str(out),
                                        hooks="beta", context_size=CONTEXT, dry_run=True,
                                        **options))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "documents": counter.documents, "tokens": counter.characters,
            "contexts": result.plan.n_prompts}


def bare_tokenizer(docs: list[str]) -> dict:
    tokenizer = build_tiny_tokenizer()
    start = time.perf_counter()
    n = 0
    for i in range(0, len(docs), TOKENIZE_BLOCK):
        n += sum(len(t) + 1 for t in tokenizer(docs[i:i + TOKENIZE_BLOCK],
                                               add_special_tokens=False)["input_ids"])
    return {"seconds": time.perf_counter() - start, "documents": len(docs), "tokens": n,
            "contexts": n // CONTEXT}


def hash_seconds(corpus: Path) -> float:
    start = time.perf_counter()
    tabular._sha256([corpus])
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_corpus_") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.parquet"
        docs = make_corpus(corpus, args.tokens)
        budget = args.tokens // 2
        contenders = {
            "bare_tokenizer": lambda: bare_tokenizer(docs),
            "one_process": lambda: plan_once(corpus, tmp / "a.zarr"),
            "one_process_budget": lambda: plan_once(corpus, tmp / "b.zarr", max_tokens=budget),
            "shard_0/2": lambda: plan_once(corpus, tmp / "c.zarr", max_tokens=budget, shard="0/2"),
            "shard_1/2": lambda: plan_once(corpus, tmp / "c.zarr", max_tokens=budget, shard="1/2"),
        }
        for name in contenders:  # warm-up: imports, the tokenizer, the page cache
            contenders[name]()
        runs = {name: [] for name in contenders}
        for round_ in range(args.repeats):  # alternate, the order rotated each round
            names = list(contenders)
            names = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in names:
                runs[name].append(contenders[name]())
        total_tokens = sum(len(d) + 1 for d in docs)
        print(f"corpus: {len(docs):,} documents, {total_tokens:,} tokens (tiny, byte-level), "
              f"{corpus.stat().st_size / 2**20:.1f} MiB Parquet; --context-size {CONTEXT}, "
              f"budget --max-tokens {budget:,}; median of {args.repeats}")
        print(f"sha256 of the file's bytes (by a process that reads from it): "
              f"{hash_seconds(corpus) * 1e3:.1f} ms")
        header = (f"{'contender':<20}{'plan s':>9}{'docs read':>11}{'of corpus':>11}"
                  f"{'tokens read':>13}{'tokens/s':>12}{'contexts':>10}{'vs one_process':>16}")
        print(header)
        reference = statistics.median(r["seconds"] for r in runs["one_process"])
        for name, results in runs.items():
            seconds = statistics.median(r["seconds"] for r in results)
            r = results[0]
            print(f"{name:<20}{seconds:>9.3f}{r['documents']:>11,}{r['documents'] / len(docs):>11.1%}"
                  f"{r['tokens']:>13,}{r['tokens'] / seconds:>12,.0f}{r['contexts']:>10,}"
                  f"{seconds / reference:>15.2f}x")


if __name__ == "__main__":
    main()
