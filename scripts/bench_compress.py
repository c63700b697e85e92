"""Which --compressor: write the same real activations with none, zstd and blosc, side by side.

Captures the default hooks of a random Qwen3.5 (the model of bench.py) over a few batches,
then writes them as gdn-dump's whole-chunk float16 arrays with each compressor, alternating in
rounds, and prints write MB/s (of uncompressed bytes), CPU seconds and the compression ratio.

    python scripts/bench_compress.py [--batches 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402

from gdn_dump.run.capture import Capture, pad_batch  # noqa: E402
from gdn_dump.catalogue import Catalogue  # noqa: E402
from gdn_dump.store.create import compressors_for  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    _, model = bench.build_model()
    hooks = Catalogue(model.config).select(None, None)
    capture = Capture(model.bridge, hooks, "float16", model.device)
    rng = np.random.default_rng(0)
    data: dict[str, list[np.ndarray]] = {h.name: [] for h in hooks}
    for _ in range(args.batches):
        ids, lengths = pad_batch([list(rng.integers(0, 250, 256)) for _ in range(8)], 0)
        for name, rows in capture.run(ids, lengths).numpy_rows():
            data[name].append(rows)
    arrays = {name: np.concatenate(parts) for name, parts in data.items()}
    total = sum(a.nbytes for a in arrays.values())
    print(f"{len(arrays)} arrays, {total / 2**20:.0f} MiB of float16/float32 activations "
          f"({args.batches * 8 * 256} tokens), torch threads {torch.get_num_threads()}")
    results: dict[str, list[tuple[float, float, int]]] = {c: [] for c in ("none", "zstd", "blosc")}
    tmp = Path(tempfile.mkdtemp())
    for _ in range(args.repeats):
        for name in results:
            out = tmp / f"{name}.zarr"
            shutil.rmtree(out, ignore_errors=True)
            group = zarr.open_group(str(out), mode="w", zarr_format=3)
            c0, t0 = cpu_seconds(), time.perf_counter()
            for key, values in arrays.items():
                arr = group.create_array(key, shape=values.shape, chunks=values.shape,
                                         dtype=values.dtype, compressors=compressors_for(name))
                arr[:] = values
            seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            stored = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            results[name].append((seconds, cpu, stored))
    shutil.rmtree(tmp)
    print(f"{'compressor':12s}{'MB/s':>10s}{'CPU s':>10s}{'ratio':>10s}")
    for name, runs in results.items():
        seconds = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"{name:12s}{total / seconds / 1e6:10.0f}{cpu:10.2f}{total / runs[0][2]:10.3f}")


if __name__ == "__main__":
    main()
