"""Exports (issue 16): ``gdn-dump export --format saelens`` against reading the same rows.

A packed store of the built-in ``tiny`` model (``--tokens`` tokens in contexts of 128, the hook
``blocks.0.linear_attn.hook_recurrence_out``, float32: 4 heads x 16 = 64 floats a row) is written
once; then, side by side in alternating rounds (the median of ``--repeats``):

- ``iter_batches``: ``Store.iter_batches(hook, batch_tokens=4096)`` over every row, shuffled:
  the reading ceiling;
- ``sae_batches``: one epoch of ``Store.sae_batches`` (bare torch ``[4096, 64]`` tensors);
- ``export_ordered``: the SAELens cache in store order (one pass: read, write ``.arrow``);
- ``export_shuffled``: the default, shuffled on disk (read, write to the shuffled places, write
  ``.arrow``).

MB/s are of the hook's row bytes (``tokens x 256``); the ratio is over ``iter_batches``. Run::

    python scripts/bench_export.py [--tokens 262144] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gdn_dump import open_store
from gdn_dump.read.exports.saelens import export_saelens
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract

HOOK = "blocks.0.linear_attn.hook_recurrence_out"
CONTEXT = 128


def make_store(tmp: Path, tokens: int) -> Path:
    rng = np.random.default_rng(0)
    words = ["gated", "delta", "rule", "state", "decay", "write", "value", "key", "query"]
    docs, n = [], 0
    while n < tokens * 1.05:
        text = " ".join(rng.choice(words, size=int(rng.integers(10, 200))))
        docs.append(text)
        n += len(text) + 1
    (tmp / "corpus.txt").write_text("\n".join(docs) + "\n")
    out = tmp / "acts.zarr"
    extract(ExtractOptions(model="tiny", prompts=str(tmp / "corpus.txt"), out=str(out),
                           hooks="recurrence_out", layers="0", dtype="float32",
                           context_size=CONTEXT, max_tokens=tokens, stats=False))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=262_144)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        tmp = Path(tmp)
        path = make_store(tmp, args.tokens)
        store = open_store(path)
        row_bytes = int(np.prod(store[HOOK].shape[1:])) * store[HOOK].dtype.itemsize
        n_rows = int(store.prompt_length.sum())
        mb = n_rows * row_bytes / 1e6

        def read_all():
            for _ in store.iter_batches(HOOK, batch_tokens=4096, seed=0):
                pass

        def sae_epoch():
            stream = store.sae_batches(HOOK, batch_tokens=4096, seed=0)
            for _ in range(n_rows // 4096):
                next(stream)

        def export(shuffle):
            def run():
                out = tmp / "cache"
                shutil.rmtree(out, ignore_errors=True)
                export_saelens(store, [HOOK], out, shuffle=shuffle)
            return run

        contenders = {"iter_batches": read_all, "sae_batches": sae_epoch,
                      "export_ordered": export(False), "export_shuffled": export(True)}
        for run in contenders.values():  # warm-up: imports, page cache
            run()
        times = {name: [] for name in contenders}
        for r in range(args.repeats):
            names = list(contenders)[r % len(contenders):] + list(contenders)[:r % len(contenders)]
            for name in names:
                start = time.perf_counter()
                contenders[name]()
                times[name].append(time.perf_counter() - start)
        print(f"store: tiny, {n_rows:,} rows of {HOOK} ({row_bytes} B, float32) in contexts of "
              f"{CONTEXT}: {mb:.0f} MB; median of {args.repeats}")
        print(f"{'contender':<18}{'seconds':>9}{'MB/s':>9}{'vs iter_batches':>17}")
        base = statistics.median(times["iter_batches"])
        for name, values in times.items():
            seconds = statistics.median(values)
            print(f"{name:<18}{seconds:>9.3f}{mb / seconds:>9.0f}{base / seconds:>16.2f}x")


if __name__ == "__main__":
    main()
