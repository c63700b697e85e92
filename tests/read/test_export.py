"""gdn-dump export --format saelens and Store.sae_batches: SAELens's cache format exactly, rows
equal to the store's (after undoing the recorded shuffle), bounded writing, and endless batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

datasets = pytest.importorskip("datasets")
torch = pytest.importorskip("torch")

from gdn_dump.cli.app import app  # noqa: E402
from gdn_dump import open_store  # noqa: E402
from gdn_dump.read.exports.saelens import ORDER_FILE, SIDECAR, export_saelens  # noqa: E402

V = "blocks.0.linear_attn.hook_v"
BETA = "blocks.1.linear_attn.hook_beta"
N = 32


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny):
    """A packed store (contexts of N) and one of whole prompts, float32, hooks v and beta."""
    from gdn_dump.run.options import ExtractOptions
    from gdn_dump.run.pipeline import extract

    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta"]
    lines = [" ".join(rng.choice(words, size=int(rng.integers(2, 30)))) for _ in range(60)]
    (root / "p.txt").write_text("\n".join(lines) + "\n")
    for name, extra in (("packed.zarr", {"context_size": N}), ("prompts.zarr", {})):
        extract(ExtractOptions(model="tiny", prompts=str(root / "p.txt"), out=str(root / name),
                               hooks="v,beta", dtype="float32", **extra), model=tiny)
    return root / "packed.zarr", root / "prompts.zarr"


def contexts_of(store, n):
    """Every context of n rows in store order: (prompt, first row) — the independent cut."""
    out = []
    for p in range(store.n_prompts):
        start, length = int(store.prompt_start[p]), int(store.prompt_length[p])
        out += [(p, start + k * n) for k in range(length // n)]
    return out


def test_saelens_cache_has_the_format_and_the_store_rows(stores, tmp_path):
    packed, _ = stores
    store = open_store(packed)
    (done,) = export_saelens(store, [V], tmp_path / "cache", seed=7)
    ds = datasets.load_from_disk(str(tmp_path / "cache"))
    d_in = int(np.prod(store[V].shape[1:]))
    assert ds.features == datasets.Features({
        V: datasets.Array2D(shape=(N, d_in), dtype="float32"),
        "token_ids": datasets.Sequence(datasets.Value("int32"), length=N)})
    expected = contexts_of(store, N)
    assert len(ds) == len(expected) == done.contexts and done.d_in == d_in
    # undo the recorded shuffle: the order file, and the permutation the sidecar names
    order = np.load(tmp_path / "cache" / ORDER_FILE)
    perm = np.random.default_rng(7).permutation(len(expected))
    assert order.tolist() == [list(expected[i]) for i in perm]
    assert sorted(map(tuple, order.tolist())) == expected  # every context exactly once
    meta = json.loads((tmp_path / "cache" / SIDECAR).read_text())
    assert (meta["hook"], meta["context_size"], meta["d_in"], meta["seed"]) == (V, N, d_in, 7)
    assert meta["source"]["provenance"]["packing"]["context_size"] == N
    ds.set_format("numpy")
    values, tokens = store[V][:], store["tokens"][:]
    for i in range(len(ds)):
        _, row = order[i]
        assert np.array_equal(ds[i][V], values[row:row + N].reshape(N, -1))
        assert np.array_equal(ds[i]["token_ids"], tokens[row:row + N])


def test_head_float16_no_shuffle_and_several_hooks(stores, tmp_path):
    packed, _ = stores
    store = open_store(packed)
    export_saelens(store, [V], tmp_path / "h", head=1, shuffle=False, dtype="float16")
    ds = datasets.load_from_disk(str(tmp_path / "h"))
    ds.set_format("numpy")
    assert ds.features[V] == datasets.Array2D(shape=(N, store[V].shape[2]), dtype="float16")
    order = np.load(tmp_path / "h" / ORDER_FILE)
    assert order.tolist() == [list(c) for c in contexts_of(store, N)]  # store order
    row = order[3][1]
    assert np.array_equal(ds[3][V], store[V][row:row + N, 1].astype(np.float16))
    both = export_saelens(store, [V, BETA], tmp_path / "two", context_size=16)
    assert [e.path for e in both] == [tmp_path / "two" / V, tmp_path / "two" / BETA]
    beta = datasets.load_from_disk(str(tmp_path / "two" / BETA))
    assert beta.features[BETA].shape == (16, store[BETA].shape[1])


def test_whole_prompts_need_a_context_size_and_drop_remainders(stores, tmp_path):
    _, prompts = stores
    store = open_store(prompts)
    with pytest.raises(Exception, match="give --context-size"):
        export_saelens(store, [V], tmp_path / "x")
    (done,) = export_saelens(store, [V], tmp_path / "x", context_size=8)
    lengths = store.prompt_length
    assert done.contexts == int((lengths // 8).sum()) and done.dropped_rows == int((lengths % 8).sum())


def test_bounded_shards_and_overwrite(stores, tmp_path, monkeypatch):
    """Small shard and read sizes: many .arrow files, still the same rows; --overwrite replaces
    only an export."""
    import gdn_dump.read.exports.saelens as saelens

    packed, _ = stores
    store = open_store(packed)
    monkeypatch.setattr(saelens, "READ_BYTES", 20_000)
    export_saelens(store, [V], tmp_path / "big", seed=1)
    export_saelens(store, [V], tmp_path / "small", seed=1, shard_bytes=100_000)
    assert len(list((tmp_path / "small").glob("*.arrow"))) > 3
    a = datasets.load_from_disk(str(tmp_path / "big")).with_format("numpy")[:][V]
    b = datasets.load_from_disk(str(tmp_path / "small")).with_format("numpy")[:][V]
    assert np.array_equal(a, b)
    export_saelens(store, [V], tmp_path / "small", seed=2, overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="not a gdn-dump export"):
        export_saelens(store, [V], tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").exists()


@pytest.mark.parametrize("args, needles", [
    (["--hook", "blocks.0.linear_attn.hook_q"], ["'blocks.0.linear_attn.hook_q'", "not a per-token hook"]),
    (["--hook", V, "--head", "99"], ["--head 99 is out of range"]),
    (["--hook", BETA, "--head", "0"], ["--head needs a hook with heads and features"]),
    (["--hook", V, "--context-size", "100000"], ["--context-size 100000 is larger than every prompt"]),
    (["--hook", V, "--format", "parquet"], ["--format 'parquet': unknown export format", "saelens"]),
], ids=["unknown-hook", "head-range", "head-scalar", "context-too-long", "unknown-format"])
def test_export_refusals_are_one_line(stores, tmp_path, args, needles):
    packed, _ = stores
    options = ["--format", "saelens"] if "--format" not in args else []
    result = cli("export", packed, *options, *args, "--out", tmp_path / "out")
    err = result.stderr
    assert result.exit_code == 2 and err.count("\n") == 1 and err.startswith("gdn-dump: error: "), err
    assert all(n in err for n in needles), err
    assert not (tmp_path / "out").exists()


def test_export_refuses_an_existing_out_and_a_missing_datasets(stores, tmp_path, monkeypatch):
    packed, _ = stores
    (tmp_path / "out").mkdir()
    result = cli("export", packed, "--format", "saelens", "--hook", V, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "exists; pass --overwrite" in result.stderr
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    result = cli("export", packed, "--format", "saelens", "--hook", V, "--out", tmp_path / "o2")
    assert result.exit_code == 2 and "pip install 'gdn-dump[saelens]'" in result.stderr


def test_export_cli_writes_the_cache(stores, tmp_path):
    packed, _ = stores
    result = cli("export", packed, "--format", "saelens", "--hook", V, "--out", tmp_path / "c", "-q")
    assert result.exit_code == 0, result.stderr
    assert len(datasets.load_from_disk(str(tmp_path / "c"))) == len(contexts_of(open_store(packed), N))


def test_sae_batches_cover_every_row_once_per_epoch_and_cycle(stores):
    _, prompts = stores
    store = open_store(prompts)
    values = store[V][:]
    owned = np.concatenate([values[s:s + n] for s, n in zip(store.prompt_start, store.prompt_length)])
    owned = owned.reshape(len(owned), -1)
    n, batch = len(owned), 50
    stream = store.sae_batches(V, batch_tokens=batch, seed=3, block_tokens=64)
    epochs = 3
    got = []
    while len(got) * batch < epochs * n:
        tensor = next(stream)
        assert isinstance(tensor, torch.Tensor) and tensor.shape == (batch, owned.shape[1])
        assert tensor.dtype == torch.float32
        got.append(tensor.numpy())
    rows = np.concatenate(got)
    key = lambda a: sorted(map(bytes, a))  # noqa: E731 - rows as bytes, in a canonical order
    spans = [rows[e * n:(e + 1) * n] for e in range(epochs)]
    for span in spans:
        assert key(span) == key(owned)  # every owned row exactly once in each epoch
    assert not np.array_equal(spans[0], spans[1])  # a new order each epoch
    heads = next(store.sae_batches(V, batch_tokens=batch, head=2, seed=3))
    assert heads.shape == (batch, store[V].shape[2])


EXPORT_RSS = """
import sys
import gdn_dump.read.exports.saelens as saelens
from gdn_dump import open_store
saelens.READ_BYTES = 1 << 20
saelens.export_saelens(open_store(sys.argv[1]), [sys.argv[2]], sys.argv[3], shard_bytes=4 << 20)
# VmHWM, not ru_maxrss: an exec'd child's ru_maxrss starts at the forking parent's peak
print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0])
"""


def test_export_memory_does_not_grow_with_the_store(tmp_path, tiny):
    """Peak RSS of a shuffled export of a store 12x larger (48 MiB of rows more) grows by far
    less than the rows: the store is read a block at a time, the cache written a batch at a time."""
    import subprocess
    import sys

    from gdn_dump.run.options import ExtractOptions
    from gdn_dump.run.pipeline import extract

    (tmp_path / "p.txt").write_text(("delta rule state " * 40 + "\n") * 320)
    peaks, sizes = {}, {}
    for name, tokens in (("small", 16_384), ("large", 196_608)):
        out = tmp_path / f"{name}.zarr"
        extract(ExtractOptions(model="tiny", prompts=str(tmp_path / "p.txt"), out=str(out),
                               hooks="v", layers="0", dtype="float32", context_size=128,
                               max_tokens=tokens, stats=False), model=tiny)
        sizes[name] = tokens * int(np.prod(open_store(out)[V].shape[1:])) * 4
        result = subprocess.run([sys.executable, "-c", EXPORT_RSS, str(out), V, str(tmp_path / f"{name}-cache")],
                                capture_output=True, text=True, check=True)
        peaks[name] = int(result.stdout.split()[-1]) * 1024
    assert sizes["large"] - sizes["small"] >= 44 * 2**20
    assert peaks["large"] - peaks["small"] < 16 * 2**20, peaks  # (measured: 5-14 MiB, noisy)
