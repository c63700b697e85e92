"""Benchmark: ``gdn_dump.run.pipeline.extract`` against a bare forward, the bridge, a naive peer and the disk.

Main case: one random-initialised Qwen3.5 text model (hidden 512, 8 layers: 3 GDN + 1 attention,
twice, so GDN layers 0-2 and 4-6; GDN heads 4 key / 8 value of dim 64; attention 8 heads / 2 kv of
dim 64; MLP 1536), the byte-level ``tiny`` tokenizer, and prompts of random ASCII letters that
tokenize to exactly ``--seq-len`` tokens; the default hooks (``Catalogue(config).select(None,
None)``), stored as ``--dtype`` (per-head scalars float32). Contenders, on the same padded batches
of ``--batch-size`` prompts:

- ``bare_forward``: the ceiling. The HF base model (``Qwen3_5TextModel``, no lm_head) of an
  untouched deep copy of the HF model (booting the bridge swaps the HF model's submodules for
  TransformerLens bridge components), its ``layers`` cut to the ``stop`` layers extract runs
  (``gdn_dump.run.capture.stop_layer``: up to the last layer with a selected hook) and its final norm
  replaced by ``Identity`` (extract stops before ``ln_final``), called as ``base(input_ids,
  use_cache=False)`` under ``torch.inference_mode``: no hooks, nothing stored.
- ``bridge_in_memory``: ``bridge.run_with_cache(input_ids, names_filter=<the hooks>,
  use_cache=False, stop_at_layer=stop)`` per batch; the cache is dropped before the next batch;
  nothing is cast or written.
- ``naive``: what a user writes by hand: the same ``run_with_cache`` without ``stop_at_layer`` (all
  layers + lm_head), then per hook drop padding, cast to the store's dtype and
  ``zarr.Array.append`` the batch to arrays created with shape ``(0, ...)``, extract's chunks and
  no compressor.
- ``extract``: ``gdn_dump.run.pipeline.extract`` with default options but ``--no-stats`` (the same work
  as the naive peer: capture and write), TensorStore writer, into a
  temporary directory; the whole call is timed (planning, store creation, capture, writing,
  finalising). ``extract+sync`` is the same run plus an ``os.sync()`` right after it, so the store
  is on disk, not only in the page cache. ``extract_stats``: the default run, with the per-head
  statistics (on the CPU, float64 on the sink thread), to show their cost. ``extract_states``: the
  default run plus ``--hooks default,ssm_state --state-every 64`` (every GDN layer's S_t every 64
  tokens, float32, with their norm and effective-rank statistics); its time over ``extract_stats``
  is the cost of the states (target: at most 1.3x).
- ``disk_dd``: a raw sequential write of the store's byte count (``plan.total_bytes``) into the same
  directory: 8 MiB blocks of random bytes generated once, ``os.write`` then ``fsync``, timed with
  the fsync: the disk bandwidth.

Each contender is warmed up once on one batch; then the contenders alternate in rounds, the order
rotated each round (A, B, C, then B, C, A, ...), dirty pages flushed (``os.sync``) before each
timed run, for ``--repeats`` rounds. The median per contender is reported (and the fastest run,
since contention only ever slows a run down), with the CPU / IO stall seconds of each run from
/proc/pressure to flag runs hit by other load. After the rounds, one vector hook and one scalar
hook of the naive store and of the extract store are compared value for value.

IO-bound case (``--skip-io``): the built-in ``tiny`` model, every GDN hook of every GDN layer,
float32: extract and extract+sync against ``disk_dd`` of that store's byte count, same rounds.
Peak RSS (``--skip-rss``): extract of the main model on N and 10N prompts of 64 tokens, each in a
fresh process (``--rss-child``) reporting its peak RSS: VmHWM, since ``ru_maxrss`` of an exec'd
child starts at the forking parent's peak (printed too).
Long context (``--long``): one prompt of 8k, 16k, 32k and 64k tokens on ``tiny``, extract
(per-token hooks; held and streamed rows) and ``attn-matrix``, beside a bare HF forward with SDPA
(and eager): peak RSS, its ``--dry-run`` estimate and tokens/s; each run a fresh process, so the
table is ``scripts/bench_long.py``'s, which this calls (``--long-lengths``).
Corpora (``--corpus``): planning a packed 1M-token Parquet corpus in one process and in each of two
``--shard`` processes, beside the bare tokenizer: seconds, tokens/s and the fraction of the corpus
each read (``scripts/bench_corpus.py``, which this calls).
Exports (``--export``): ``gdn-dump export --format saelens`` (shuffled and in order) and
``Store.sae_batches`` against ``Store.iter_batches`` over the same rows, MB/s and ratios
(``scripts/bench_export.py``, which this calls). Run::

    python scripts/bench.py [--batches 8] [--batch-size 8] [--seq-len 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import importlib.metadata
import inspect
import os
import platform
import random
import resource
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gdn_dump.run.capture import stop_layer, pad_batch  # noqa: E402
from gdn_dump.catalogue import GDN_HOOKS, Catalogue  # noqa: E402
from gdn_dump.catalogue import ATTENTION_LAYER_TYPE, GDN_LAYER_TYPE  # noqa: E402
from gdn_dump.model.load import LoadedModel, load_model, wrap_model  # noqa: E402
from gdn_dump.tokenizer import build_tiny_tokenizer  # noqa: E402
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract  # noqa: E402
from gdn_dump.dtypes import SCALAR_DTYPE  # noqa: E402
from gdn_dump.store.layout import make_plan  # noqa: E402

BENCH_TEXT_CONFIG = dict(
    hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
    layer_types=([GDN_LAYER_TYPE] * 3 + [ATTENTION_LAYER_TYPE]) * 2,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64,
    linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
    linear_value_head_dim=64, linear_conv_kernel_dim=4, max_position_embeddings=8192,
    tie_word_embeddings=False,
)
SEED = 0
DD_BLOCK = 8 << 20
RSS_SEQ_LEN = 64  # mean tokens of the RSS case's ragged prompts
# The RSS case bounds what extract holds by configuration (a 64 MiB sorting window, 1024-row
# chunks) so that N prompts already fill it: the measure is growth with the number of prompts.
RSS_WINDOW = 64 << 20
RSS_CHUNK = 1024
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


# --------------------------------------------------------------------------------------- setup

def build_model(with_bare: bool = True) -> tuple[torch.nn.Module | None, LoadedModel]:
    """The bench model booted in a bridge, and (``with_bare``) an untouched HF copy of it."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    tokenizer = build_tiny_tokenizer()
    config = Qwen3_5TextConfig(vocab_size=len(tokenizer) + 3, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, **BENCH_TEXT_CONFIG)
    config._attn_implementation = "eager"
    torch.manual_seed(SEED)
    hf_model = Qwen3_5ForCausalLM(config).eval()
    # booting the bridge wraps hf_model's modules in place: the bare forward runs on a copy
    bare = copy.deepcopy(hf_model).eval() if with_bare else None
    return bare, wrap_model(hf_model, tokenizer, name="bench", device=torch.device("cpu"),
                            dtype=torch.float32)


def truncated_base(bare: torch.nn.Module, stop: int | None) -> torch.nn.Module:
    """A copy of ``bare.model`` running only its first ``stop`` layers, without the final norm.

    ``Qwen3_5TextModel.forward`` iterates ``self.layers[:config.num_hidden_layers]`` and picks each
    layer's mask by ``config.layer_types[i]``: cutting the ModuleList is enough; the config is cut
    to match so nothing else sees a layer that is not there.
    """
    base = copy.deepcopy(bare.model).eval()
    if stop is None:
        return base
    base.layers = torch.nn.ModuleList(list(base.layers)[:stop])
    base.config.num_hidden_layers = stop
    base.config.layer_types = list(base.config.layer_types)[:stop]
    base.norm = torch.nn.Identity()
    return base


def write_prompts(path: Path, n: int, seq_len: int, tokenizer, seed: int) -> list[list[int]]:
    """``n`` lines of random ASCII letters, each exactly ``seq_len`` tokens; returns the tokens."""
    rng = random.Random(seed)
    texts = ["".join(rng.choices(string.ascii_letters, k=seq_len)) for _ in range(n)]
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    bad = [len(t) for t in ids if len(t) != seq_len]
    if bad:
        raise SystemExit(f"prompts tokenize to {bad[:3]} tokens, not {seq_len}")
    return ids


def padded_batches(token_lists, batch_size: int, pad_id: int):
    return [pad_batch(token_lists[i:i + batch_size], pad_id)
            for i in range(0, len(token_lists), batch_size)]


# ---------------------------------------------------------------------------------- contenders

def run_bare(base, batches) -> None:
    with torch.inference_mode():
        for ids, _ in batches:
            base(ids, use_cache=False)


def run_in_memory(model: LoadedModel, batches, names: list[str], stop: int | None) -> None:
    kwargs = {} if stop is None else {"stop_at_layer": stop}
    for ids, _ in batches:
        with torch.inference_mode():
            _, cache = model.bridge.run_with_cache(ids, names_filter=names, use_cache=False, **kwargs)
        del cache


def run_naive(model: LoadedModel, batches, specs, out: Path) -> None:
    """run_with_cache + drop padding + cast + zarr append, one batch at a time."""
    import zarr

    names = [spec.name for spec in specs if spec.hook is not None]
    group = zarr.open_group(str(out), mode="w", zarr_format=3)
    arrays = {spec.name: group.create_array(spec.name, shape=(0, *spec.shape[1:]), chunks=spec.chunks,
                                            dtype=spec.dtype, compressors=None, fill_value=0)
              for spec in specs}
    dtypes = {spec.name: _TORCH_DTYPES[spec.dtype] for spec in specs if spec.hook is not None}
    for ids, lengths in batches:
        mask = torch.arange(ids.shape[1])[None, :] < torch.as_tensor(lengths)[:, None]
        with torch.inference_mode():
            _, cache = model.bridge.run_with_cache(ids, names_filter=names, use_cache=False)
        arrays["tokens"].append(ids[mask].to(torch.int32).numpy())
        for name in names:
            arrays[name].append(cache[name][mask].to(dtypes[name]).cpu().numpy())
        del cache


def run_extract(model: LoadedModel, prompts: Path, out: Path, batch_size: int, dtype: str,
                hooks: str | None = None, **options):
    opts = ExtractOptions(model=model.name, prompts=str(prompts), out=str(out), hooks=hooks,
                          batch_size=batch_size, dtype=dtype, overwrite=True, force=True, **options)
    return extract(opts, model=model)


def run_writer_only(plan, out: Path, batch_rows: int) -> None:
    """gdn-dump's write path alone: the plan's store fed batch-sized blocks of rows (made once)
    through ``RowWriter`` (TensorStore engine), as the sink feeds it; no model."""
    from gdn_dump.store.create import create_store
    from gdn_dump.store.writer import RowWriter

    rng = np.random.default_rng(0)
    blocks = {a.name: rng.standard_normal((batch_rows, *a.shape[1:])).astype(a.dtype)
              for a in plan.arrays if a.per_token}
    group = create_store(out, plan, {"bench": True}, overwrite=True)
    writer = RowWriter(group, plan.arrays, engine="tensorstore")
    for start in range(0, plan.n_rows, batch_rows):
        n = min(batch_rows, plan.n_rows - start)
        for name, block in blocks.items():
            writer.append(name, block[:n])
    writer.close()


def extract_synced(fn, out: Path, name: str | None = None) -> dict[str, float]:
    """Times ``fn(out)`` alone and with the ``os.sync()`` that puts its store on disk."""
    name = name or out.name.removesuffix(".zarr")
    t0 = time.perf_counter()
    fn(out)
    t1 = time.perf_counter()
    os.sync()
    return {name: t1 - t0, f"{name}+sync": time.perf_counter() - t0}


def disk_write(path: Path, nbytes: int, block: bytes) -> None:
    """Raw sequential write of ``nbytes`` in ``block``-sized pieces, then fsync (dd conv=fsync)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block if left >= len(block) else block[:left])
        os.fsync(fd)
    finally:
        os.close(fd)


def dd_contender(tmp: Path, nbytes: int, block: bytes):
    def run(out: Path) -> dict[str, float]:
        path = tmp / "dd.bin"
        t = time.perf_counter()
        disk_write(path, nbytes, block)
        seconds = time.perf_counter() - t
        path.unlink()
        return {"disk_dd": seconds}
    return run


# ------------------------------------------------------------------------------------ rounds

def rounds(contenders: dict, repeats: int, tmp: Path, label: str) -> dict[str, list[float]]:
    """Rotated rounds of ``fn(out)`` each; returns each row's seconds per round.

    A contender is one row timed here, or returns the rows it timed itself. The last round's
    stores are kept.
    """
    times: dict[str, list[float]] = {}
    for r in range(repeats):
        names = list(contenders)
        order = names[r % len(names):] + names[:r % len(names)]  # nobody always follows the same peer
        notes = {}
        for name in order:
            out = tmp / f"{name}.zarr"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # flush the previous contender's dirty pages so its writeback is not timed here
            p0, t = pressure(), time.perf_counter()
            rows = contenders[name](out) or {name: time.perf_counter() - t}  # or the rows it timed
            p1 = pressure()
            for row, seconds in rows.items():
                times.setdefault(row, []).append(seconds)
            stall = " ".join(f"{k} {p1[k] - p0[k]:.1f}" for k in p1 if k in p0)
            notes[name] = " ".join(f"{row} {s:.2f} s" for row, s in rows.items()) + (
                f" (stall s: {stall})" if stall else "")
            if r < repeats - 1:
                shutil.rmtree(out, ignore_errors=True)
        print(f"{label} round {r + 1}: " + ", ".join(notes[n] for n in contenders), flush=True)
    return times


def fmt_runs(ts: list[float]) -> str:
    return " ".join(f"{t:.2f}" for t in ts)


def table(times, n_tokens: int, nbytes: int, refs: tuple[str, ...] = ()) -> dict[str, float]:
    """Median, tokens/s, MB/s (of the store's bytes), x each of ``refs``, min and every run."""
    med = {row: statistics.median(ts) for row, ts in times.items()}
    print(f"{'contender':<18}{'median s':>9}{'tokens/s':>10}{'MB/s':>9}"
          + "".join(f"{'x ' + r:>{len(r) + 4}}" for r in refs) + f"{'min s':>8}   runs (s)")
    for row, s in med.items():
        mbs = f"{nbytes / s / 1e6:.1f}" + ("*" if row in ("bare_forward", "bridge_in_memory") else "")
        tps = "-" if row == "disk_dd" else f"{n_tokens / s:.0f}"
        xs = "".join(f"{'-' if row == 'disk_dd' else f'{med[r] / s:.2f}':>{len(r) + 4}}" for r in refs)
        print(f"{row:<18}{s:>9.2f}{tps:>10}{mbs:>9}{xs}{min(times[row]):>8.2f}   {fmt_runs(times[row])}")
    print(f"(MB = 1e6 bytes, store plan.total_bytes = {nbytes / 1e6:.1f} MB; * = MB/s equivalent, "
          "nothing written; x columns: tokens/s ratios of the medians)")
    return med


def target_line(label: str, ratio: float, target: float, what: str) -> None:
    print(f"{label} = {ratio:.2f}  (target >= {target:.2f}{what}; target met: "
          f"{'yes' if ratio >= target else 'NO'})")


def disk_lines(times, nbytes: int, target: float | None = None,
               rows: tuple[str, ...] = ("extract", "extract+sync")) -> None:
    disk = nbytes / statistics.median(times["disk_dd"]) / 1e6
    print(f"disk_dd: {nbytes / 1e6:.1f} MB in 8 MiB blocks + fsync: median {disk:.1f} MB/s, runs (s) "
          f"{fmt_runs(times['disk_dd'])}")
    for row in rows:
        mbs = nbytes / statistics.median(times[row]) / 1e6
        if target is None:
            print(f"{row}: {mbs:.1f} MB/s = {mbs / disk:.2f} of disk_dd")
        else:
            target_line(f"{row} MB/s {mbs:.1f} / disk_dd MB/s", mbs / disk, target,
                        " of raw disk bandwidth")


# ------------------------------------------------------------------------------------ checks

def check_truncation(bare, base, model: LoadedModel, ids, names: list[str], stop) -> int | None:
    """The cut bare model computes the residual stream extract stops at; returns the stop
    bridge_in_memory passes to run_with_cache (None if it does not take ``stop_at_layer``)."""
    takes_stop = "stop_at_layer" in inspect.signature(model.bridge.run_with_cache).parameters
    kwargs = {"stop_at_layer": stop} if takes_stop and stop is not None else {}
    with torch.inference_mode():
        got = base(ids, use_cache=False).last_hidden_state
        full = bare.model(ids, use_cache=False, output_hidden_states=True).hidden_states
        ref = full[stop] if stop is not None else full[-1]
        resid, cache = model.bridge.run_with_cache(ids, names_filter=names, use_cache=False, **kwargs)
    if not takes_stop:
        print("NOTE: bridge.run_with_cache takes no stop_at_layer: bridge_in_memory runs all layers")
    vs_bridge = (f", vs bridge run_with_cache(stop_at_layer={stop}) output {tuple(resid.shape)} "
                 f"{float((got - resid).abs().max()):.3g}" if kwargs else "")
    print(f"check bare cut to {len(base.layers)} of {len(bare.model.layers)} layers (norm "
          f"{type(base.norm).__name__}): max |diff| vs full HF hidden_states[{stop}] "
          f"{float((got - ref).abs().max()):.3g}{vs_bridge}; run_with_cache cached "
          f"{sum(n in cache for n in names)}/{len(names)} hooks")
    return kwargs.get("stop_at_layer")


def check_same(naive_path: Path, extract_path: Path, hooks, token_lists) -> None:
    """Like-for-like check: one vector hook and one scalar hook hold identical values in both."""
    import zarr

    naive = zarr.open_group(str(naive_path), mode="r")
    ext = zarr.open_group(str(extract_path), mode="r")
    picks = [next(h for h in hooks if h.short == "recurrence_out"), next(h for h in hooks if h.scalar)]
    tokens_equal = np.array_equal(naive["tokens"][:], ext["tokens"][:]) and np.array_equal(
        ext["tokens"][:], np.concatenate([np.asarray(t, dtype=np.int32) for t in token_lists]))
    for hook in picks:
        a, b = naive[hook.name][:], ext[hook.name][:]
        same = a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
        diff = (float(np.max(np.abs(a.astype(np.float32) - b.astype(np.float32))))
                if a.shape == b.shape else float("nan"))
        print(f"check {hook.name}: naive {a.shape} {a.dtype} vs extract {b.shape} {b.dtype}: "
              f"{'identical' if same else 'DIFFERENT'} (max |diff| {diff:.3g}); tokens equal: {tokens_equal}")


# ------------------------------------------------------------------------------------- cases

def main_case(args, tmp: Path, block: bytes) -> None:
    t0 = time.perf_counter()
    bare, model = build_model()
    print(f"model: random Qwen3.5 text, {BENCH_TEXT_CONFIG}, vocab {model.config.vocab_size}, "
          f"{sum(p.numel() for p in model.hf_model.parameters()) / 1e6:.1f}M params, float32, "
          f"kernels {model.kernel_backend}, attn eager (built in {time.perf_counter() - t0:.1f} s)")
    n_prompts = args.batches * args.batch_size
    n_tokens = n_prompts * args.seq_len
    prompts, warm_prompts = tmp / "prompts.txt", tmp / "warm.txt"
    token_lists = write_prompts(prompts, n_prompts, args.seq_len, model.tokenizer, SEED)
    warm_lists = write_prompts(warm_prompts, args.batch_size, args.seq_len, model.tokenizer, SEED + 1)
    pad_id = model.tokenizer.pad_token_id or 0
    batches = padded_batches(token_lists, args.batch_size, pad_id)
    warm_batches = padded_batches(warm_lists, args.batch_size, pad_id)

    hooks = Catalogue(model.config).select(None, None)
    names = [h.name for h in hooks]
    stop = stop_layer(hooks)
    plan = make_plan(hooks, np.array([len(t) for t in token_lists]), storage_dtype=args.dtype)
    warm_plan = make_plan(hooks, np.array([len(t) for t in warm_lists]), storage_dtype=args.dtype)
    nbytes = plan.total_bytes
    print(f"work: {args.batches} batches x {args.batch_size} prompts x {args.seq_len} tokens = "
          f"{n_tokens} tokens; {len(hooks)} default hooks ({len({h.layer for h in hooks})} GDN "
          f"layers x {len({h.short for h in hooks})}); store {nbytes / 1e6:.1f} MB {args.dtype} "
          f"(scalars {SCALAR_DTYPE}), chunks e.g. {plan.arrays[1].name} {plan.arrays[1].chunks}; "
          f"no compressor; stores under {tmp}")
    print(f"stop: extract, bare_forward and bridge_in_memory run layers 0-{stop - 1} of "
          f"{model.config.num_hidden_layers} (no final norm, no lm_head); naive runs all + lm_head")
    base = truncated_base(bare, stop)
    mem_stop = check_truncation(bare, base, model, warm_batches[0][0], names, stop)

    def contenders(batches, prompts, specs) -> dict:
        return {
            "bare_forward": lambda out: run_bare(base, batches),
            "bridge_in_memory": lambda out: run_in_memory(model, batches, names, mem_stop),
            "naive": lambda out: run_naive(model, batches, specs, out),
            "extract": lambda out: extract_synced(
                lambda o: run_extract(model, prompts, o, args.batch_size, args.dtype, stats=False), out),
            # the default run: plus the per-head statistics (on the CPU, the sink thread's float64)
            "extract_stats": lambda out: extract_synced(
                lambda o: run_extract(model, prompts, o, args.batch_size, args.dtype), out),
            # the default run plus the recurrent state of every GDN layer every 64 tokens
            "extract_states": lambda out: extract_synced(
                lambda o: run_extract(model, prompts, o, args.batch_size, args.dtype,
                                      hooks="default,ssm_state", state_every=64), out),
        }

    for name, fn in contenders(warm_batches, warm_prompts, warm_plan.arrays).items():  # warm-up
        fn(tmp / "warm.zarr")
        shutil.rmtree(tmp / "warm.zarr", ignore_errors=True)
    timed = {**contenders(batches, prompts, plan.arrays), "disk_dd": dd_contender(tmp, nbytes, block)}
    times = rounds(timed, args.repeats, tmp, "main")
    print()
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (1 min)")
    med = table(times, n_tokens, nbytes, refs=("bare_forward", "bridge_in_memory"))
    print()
    target_line("extract / bare_forward", med["bare_forward"] / med["extract"], 0.88, "")
    target_line("extract / bridge_in_memory", med["bridge_in_memory"] / med["extract"], 0.95, "")
    target_line("extract / naive", med["naive"] / med["extract"], 1.3, "")
    print(f"extract+sync / bare_forward = {med['bare_forward'] / med['extract+sync']:.2f}")
    print(f"extract_stats / extract = {med['extract'] / med['extract_stats']:.2f} (the default "
          "per-head statistics on the CPU; --no-stats skips them, on a GPU they run on the device)")
    states_ratio = med["extract_states"] / med["extract_stats"]
    print(f"extract_states / extract_stats (time) = {states_ratio:.2f}  (target <= 1.30; target "
          f"met: {'yes' if states_ratio <= 1.3 else 'NO'}; states every 64 tokens, float32, with "
          "their norm / effective-rank statistics)")
    disk_lines(times, nbytes)
    check_same(tmp / "naive.zarr", tmp / "extract.zarr", hooks, token_lists)
    for name in timed:
        shutil.rmtree(tmp / f"{name}.zarr", ignore_errors=True)


def io_case(args, tmp: Path, block: bytes) -> None:
    model = load_model("tiny", device="cpu")
    hooks = ",".join(GDN_HOOKS)  # every GDN hook; layers default to every GDN layer
    prompts, warm_prompts = tmp / "io_prompts.txt", tmp / "io_warm.txt"
    token_lists = write_prompts(prompts, args.io_prompts, args.io_seq_len, model.tokenizer, SEED)
    write_prompts(warm_prompts, args.batch_size, args.io_seq_len, model.tokenizer, SEED + 1)
    run_extract(model, warm_prompts, tmp / "io_warm.zarr", args.batch_size, "float32", hooks)
    shutil.rmtree(tmp / "io_warm.zarr", ignore_errors=True)
    plan = make_plan(Catalogue(model.config).select(hooks, None),
                     np.array([len(t) for t in token_lists]), storage_dtype="float32")
    n_tokens, nbytes = plan.n_rows, plan.total_bytes
    print(f"IO-bound case: tiny model ({model.config.num_hidden_layers} layers, hidden "
          f"{model.config.hidden_size}), all {len(plan.hooks)} GDN hooks ({len(GDN_HOOKS)} x "
          f"{len({h.layer for h in plan.hooks})} layers), float32, {args.io_prompts} prompts x "
          f"{args.io_seq_len} tokens = {n_tokens} tokens, store {nbytes / 1e6:.1f} MB")
    run = lambda out: run_extract(model, prompts, out, args.batch_size, "float32", hooks, stats=False)  # noqa: E731
    batches = padded_batches(token_lists, args.batch_size, model.tokenizer.pad_token_id or 0)
    names = [h.name for h in plan.hooks]
    contenders = {
        "bridge_in_memory": lambda out: run_in_memory(model, batches, names, stop_layer(plan.hooks)),
        "extract": lambda out: extract_synced(run, out),
        "writer_only": lambda out: extract_synced(
            lambda o: run_writer_only(plan, o, args.batch_size * args.io_seq_len), out),
        "disk_dd": dd_contender(tmp, nbytes, block),
    }
    times = rounds(contenders, args.repeats, tmp, "io")
    med = table(times, n_tokens, nbytes, refs=("bridge_in_memory",))
    disk_lines(times, nbytes, target=0.70, rows=("extract", "extract+sync", "writer_only",
                                                 "writer_only+sync"))
    disk = nbytes / med["disk_dd"]
    ceiling = min(disk, nbytes / med["bridge_in_memory"])
    print(f"the model computes {nbytes / med['bridge_in_memory'] / 1e6:.1f} MB/s of these hooks in "
          f"memory (bridge_in_memory) against {disk / 1e6:.1f} MB/s of disk: "
          f"{'compute' if ceiling < disk else 'disk'}-bound here")
    target_line("extract MB/s / min(disk_dd, bridge_in_memory) MB/s",
                nbytes / med["extract"] / ceiling, 0.70, "")
    shutil.rmtree(tmp / "extract.zarr", ignore_errors=True)


def peak_rss_mib() -> tuple[float, float]:
    """(VmHWM, ru_maxrss) in MiB. After exec, ru_maxrss also holds the forking parent's peak
    (the kernel carries the old mm's high-water mark over), so VmHWM is the figure to use."""
    status = Path("/proc/self/status").read_text()
    hwm = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM:"))
    return hwm / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # both KiB


def rss_child(args, tmp: Path) -> None:
    """One extract of ``--rss-child`` prompts in this fresh process; prints its peak RSS."""
    _, model = build_model(with_bare=False)
    prompts = tmp / "rss_prompts.txt"
    rng = random.Random(SEED)  # ragged: the sorting window and the reorder buffer are exercised
    prompts.write_text("\n".join("".join(rng.choices(string.ascii_letters,
                                                     k=rng.randint(RSS_SEQ_LEN // 4, 2 * RSS_SEQ_LEN)))
                                 for _ in range(args.rss_child)) + "\n", encoding="utf-8")
    before = peak_rss_mib()[0]
    result = run_extract(model, prompts, tmp / "rss.zarr", args.batch_size, args.dtype,
                         sort_window_bytes=RSS_WINDOW, chunk_tokens=RSS_CHUNK)
    print("RSS", *peak_rss_mib(), before, result.plan.total_bytes / 1e6)


def rss_case(args, tmp: Path) -> None:
    peaks = {}
    for n in (args.rss_prompts, 10 * args.rss_prompts):
        cmd = [sys.executable, __file__, "--rss-child", str(n), "--batch-size", str(args.batch_size),
               "--dtype", args.dtype, "--tmp", str(tmp)] + (
                   ["--threads", str(args.threads)] if args.threads else [])
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RSS ")), None)
        if out.returncode or line is None:
            raise SystemExit(f"rss child failed ({out.returncode}): {out.stderr[-2000:]}")
        peaks[n], maxrss, before, mb = (float(x) for x in line.split()[1:])
        print(f"peak RSS (VmHWM), extract of {n} prompts of {RSS_SEQ_LEN // 4}-{2 * RSS_SEQ_LEN} tokens "
              f"(--sort-window {RSS_WINDOW >> 20}MiB, --chunk-tokens {RSS_CHUNK}; {mb:.1f} MB store) in "
              f"a fresh process: {peaks[n]:.0f} MiB (model loaded: {before:.0f} MiB; ru_maxrss "
              f"{maxrss:.0f} MiB; {time.perf_counter() - t:.1f} s)")
    n = args.rss_prompts
    ratio = peaks[10 * n] / peaks[n]
    print(f"peak RSS {10 * n} / {n} prompts = {ratio:.3f}  (target <= 1.10; target met: "
          f"{'yes' if ratio <= 1.1 else 'NO'})")


# -------------------------------------------------------------------------------------- main

def long_case(args) -> None:
    """One long prompt per fresh process: ``scripts/bench_long.py``'s table (one definition)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_long

    print("long context: one prompt, tiny (CPU), peak RSS above the loaded model")
    bench_long.main(["--lengths", *map(str, args.long_lengths)] if args.long_lengths else [])


def corpus_case(args) -> None:
    """Planning a packed Parquet corpus, one process vs two shards: ``scripts/bench_corpus.py``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_corpus

    print("corpora: planning a 1M-token Parquet corpus (--context-size 1024), one process vs shards")
    bench_corpus.main(["--tokens", str(args.corpus_tokens)])


def export_case(args) -> None:
    """SAELens export and sae_batches against iter_batches: ``scripts/bench_export.py``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_export

    print("exports: gdn-dump export --format saelens vs reading the same rows (tiny, float32)")
    bench_export.main(["--tokens", str(args.export_tokens)])


def machine_lines() -> list[str]:
    cpu = "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                    if line.lower().startswith("model name")), cpu)
    except (OSError, subprocess.CalledProcessError):
        pass
    return [
        f"date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {cpu}; nproc {os.cpu_count()}; {platform.platform()}",
        f"torch {torch.__version__}: threads {torch.get_num_threads()}, "
        f"interop threads {torch.get_num_interop_threads()}",
        "libraries: " + ", ".join(f"{lib} {importlib.metadata.version(lib)}" for lib in
                                  ("transformers", "transformer_lens", "zarr", "tensorstore", "numpy")),
        f"load average: {os.getloadavg()[0]:.2f} (1 min); 'stall s' = seconds some task waited for "
        "CPU / IO during that run (/proc/pressure), high values flag a contended run",
    ]


def pressure() -> dict[str, float]:
    """Seconds some task has stalled on CPU / IO so far (Linux PSI), to flag contended runs."""
    out = {}
    for kind in ("cpu", "io"):
        try:
            line = Path(f"/proc/pressure/{kind}").read_text().splitlines()[0]
            out[kind] = int(line.rsplit("total=", 1)[1]) / 1e6
        except (OSError, IndexError, ValueError):
            pass
    return out


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=8, help="batches per timed run (default 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per prompt (default 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                        help="storage dtype of the main case (default float16)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--tmp", default=None, help="directory for the temporary stores")
    parser.add_argument("--skip-io", action="store_true", help="skip the IO-bound tiny-model case")
    parser.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS case")
    parser.add_argument("--rss-prompts", type=int, default=64, help="N of the RSS case (default 64)")
    parser.add_argument("--io-prompts", type=int, default=256, help="prompts of the IO case (default 256)")
    parser.add_argument("--io-seq-len", type=int, default=512, help="tokens per IO-case prompt (default 512)")
    parser.add_argument("--long", action="store_true", help="also run the long-context case")
    parser.add_argument("--long-lengths", type=int, nargs="+", default=None,
                        help="prompt lengths of the long-context case (default bench_long's)")
    parser.add_argument("--corpus", action="store_true", help="also run the corpus-planning case")
    parser.add_argument("--corpus-tokens", type=int, default=1_000_000,
                        help="tokens of the corpus case's Parquet corpus (default 1M)")
    parser.add_argument("--export", action="store_true", help="also run the export case")
    parser.add_argument("--export-tokens", type=int, default=262_144,
                        help="rows of the export case's store (default 262144)")
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child is not None:
        tmp = Path(tempfile.mkdtemp(prefix="bench_rss_", dir=args.tmp))
        try:
            rss_child(args, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return

    print("\n".join(machine_lines()))
    block = np.random.default_rng(SEED).bytes(DD_BLOCK)  # random-ish bytes, generated once
    tmp = Path(tempfile.mkdtemp(prefix="bench_", dir=args.tmp))
    try:
        main_case(args, tmp, block)
        if not args.skip_io:
            print()
            io_case(args, tmp, block)
        if not args.skip_rss:
            print()
            rss_case(args, tmp)
        if args.long:
            print()
            long_case(args)
        if args.corpus:
            print()
            corpus_case(args)
        if args.export:
            print()
            export_case(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
