"""Benchmark: tokens/s of ``gdn_dump.pipeline.extract`` against a bare HF forward and a naive peer.

One random-initialised Qwen3.5 text model (hidden 512, 8 layers: 3 GDN + 1 attention, twice, so
6 GDN layers; GDN heads 4 key / 8 value of dim 64; attention 8 heads / 2 kv of dim 64; MLP 1536),
the byte-level ``tiny`` tokenizer, and prompts of random ASCII letters that tokenize to exactly
``--seq-len`` tokens. Contenders, on the same padded batches of ``--batch-size`` prompts:

- ``bare_forward``: ``hf_model(input_ids, use_cache=False)`` under ``torch.inference_mode`` (no
  hooks, nothing stored): the ceiling. It runs on an untouched deep copy of the HF model (same
  weights): booting the bridge swaps the HF model's submodules for TransformerLens bridge components.
- ``naive``: what a user writes by hand: ``bridge.run_with_cache(input_ids, names_filter=<the
  default hooks>, use_cache=False)``, then per hook drop padding, cast to the store's dtype
  (float16; per-head scalars float32, as extract stores them) and ``zarr.Array.append`` the batch
  to arrays created with shape ``(0, ...)``, the same chunks as extract's and no compressor.
- ``extract``: ``gdn_dump.pipeline.extract`` with the default hooks, into a temporary directory;
  the whole call is timed (planning, store creation, capture, writing, finalising).

Each contender is warmed up once on one batch; then the contenders alternate in rounds, the order
rotated each round (A, B, C, then B, C, A, ...) and dirty pages flushed (``os.sync``) before each
timed run, so no contender pays for another's writeback, for ``--repeats`` rounds; the median per contender is reported (and the
fastest run, since contention only ever slows a run down), with the CPU / IO stall seconds of
each run from /proc/pressure to flag runs hit by other load. After the rounds, one vector hook and
one scalar hook of the naive store and of the extract store are compared value for value.
Run::

    python scripts/bench_extract.py [--batches 8] [--batch-size 8] [--seq-len 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import platform
import random
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

from gdn_dump.capture import pad_batch  # noqa: E402
from gdn_dump.catalogue import Catalogue  # noqa: E402
from gdn_dump.models import (  # noqa: E402
    ATTENTION_LAYER_TYPE,
    GDN_LAYER_TYPE,
    LoadedModel,
    build_tiny_tokenizer,
    model_provenance,
    select_kernels,
)
from gdn_dump.pipeline import ExtractOptions, extract  # noqa: E402
from gdn_dump.plan import SCALAR_DTYPE, make_plan  # noqa: E402

BENCH_TEXT_CONFIG = dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    layer_types=([GDN_LAYER_TYPE] * 3 + [ATTENTION_LAYER_TYPE]) * 2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_key_heads=4,
    linear_num_value_heads=8,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    linear_conv_kernel_dim=4,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)
SEED = 0
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


# --------------------------------------------------------------------------------------- setup

def build_model() -> tuple[torch.nn.Module, LoadedModel]:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    device = torch.device("cpu")
    backend = select_kernels(device)
    tokenizer = build_tiny_tokenizer()
    config = Qwen3_5TextConfig(
        vocab_size=len(tokenizer) + 3,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **BENCH_TEXT_CONFIG,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(SEED)
    hf_model = Qwen3_5ForCausalLM(config).to(device=device, dtype=torch.float32).eval()
    # boot_transformers wraps hf_model's modules in place (its linear_attn becomes TransformerLens's
    # GatedDeltaNetBridge), so the bare forward runs on an untouched copy with the same weights.
    bare = copy.deepcopy(hf_model).eval()
    bridge = TransformerBridge.boot_transformers(
        "bench", hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=torch.float32
    )
    bridge.eval()
    return bare, LoadedModel(
        bridge=bridge, hf_model=hf_model, tokenizer=tokenizer, config=hf_model.config,
        name="bench", revision=None, device=device, dtype=torch.float32, kernel_backend=backend,
        info=model_provenance("bench", None, hf_model.config, device, torch.float32, backend),
    )


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

def run_bare(hf_model, batches) -> None:
    with torch.inference_mode():
        for ids, _ in batches:
            hf_model(ids, use_cache=False)


def run_naive(model: LoadedModel, batches, specs, out: Path) -> None:
    """run_with_cache + drop padding + cast + zarr append, one batch at a time."""
    import zarr

    names = [spec.name for spec in specs if spec.hook is not None]
    group = zarr.open_group(str(out), mode="w", zarr_format=3)
    arrays = {
        spec.name: group.create_array(spec.name, shape=(0, *spec.shape[1:]), chunks=spec.chunks,
                                      dtype=spec.dtype, compressors=None, fill_value=0)
        for spec in specs
    }
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
                writer: str = "tensorstore"):
    opts = ExtractOptions(model="bench", prompts=str(prompts), out=str(out), hooks=None,
                          batch_size=batch_size, max_batch_tokens=None, dtype=dtype,
                          compressor="none", writer=writer, overwrite=True, force=True)
    return extract(opts, model=model)


# ----------------------------------------------------------------------------------------- main

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=8, help="batches per timed run (default 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per prompt (default 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                        help="storage dtype of the stores (default float16)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--tmp", default=None, help="directory for the temporary stores")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import importlib.metadata

    import transformers
    import zarr

    for line in machine_lines():
        print(line)
    print(f"load average: {os.getloadavg()[0]:.2f} (1 min); 'stall s' below = seconds some task "
          "waited for CPU / IO during that run (/proc/pressure), high values flag a contended run")
    print(f"libraries: transformers {transformers.__version__}, transformer_lens "
          f"{importlib.metadata.version('transformer_lens')}, zarr {zarr.__version__}, "
          f"numpy {np.__version__}")

    t0 = time.perf_counter()
    bare_model, model = build_model()
    print(f"model: random Qwen3.5 text, {BENCH_TEXT_CONFIG}, vocab {model.config.vocab_size}, "
          f"{sum(p.numel() for p in model.hf_model.parameters()) / 1e6:.1f}M params, float32, "
          f"kernels {model.kernel_backend}, attn eager (built in {time.perf_counter() - t0:.1f} s)")

    n_prompts = args.batches * args.batch_size
    n_tokens = n_prompts * args.seq_len
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_", dir=args.tmp))
    try:
        prompts = tmp / "prompts.txt"
        warm_prompts = tmp / "warm.txt"
        token_lists = write_prompts(prompts, n_prompts, args.seq_len, model.tokenizer, SEED)
        warm_lists = write_prompts(warm_prompts, args.batch_size, args.seq_len, model.tokenizer, SEED + 1)
        pad_id = model.tokenizer.pad_token_id or 0
        batches = padded_batches(token_lists, args.batch_size, pad_id)
        warm_batches = padded_batches(warm_lists, args.batch_size, pad_id)

        hooks = Catalogue(model.config).select(None, None)
        plan = make_plan(hooks, np.array([len(t) for t in token_lists]), storage_dtype=args.dtype)
        warm_plan = make_plan(hooks, np.array([len(t) for t in warm_lists]), storage_dtype=args.dtype)
        specs = plan.arrays  # tokens + one array per hook, with extract's dtypes and chunks
        print(f"work: {args.batches} batches x {args.batch_size} prompts x {args.seq_len} tokens = "
              f"{n_tokens} tokens; {len(hooks)} default hooks ({len({h.layer for h in hooks})} GDN layers x "
              f"{len({h.short for h in hooks})}); "
              f"store {plan.total_bytes / 2**20:.0f} MiB {args.dtype} (scalars {SCALAR_DTYPE}), "
              f"chunks e.g. {specs[1].name} {specs[1].chunks}; no compressor; stores under {tmp}")
        print(f"extract stops after layer {max(h.layer for h in hooks)} (stop_at_layer); "
              f"bare forward and naive run all {model.config.num_hidden_layers} layers + lm_head")

        contenders = {
            "bare_forward": (lambda out: run_bare(bare_model, batches),
                             lambda out: run_bare(bare_model, warm_batches)),
            "naive": (lambda out: run_naive(model, batches, specs, out),
                      lambda out: run_naive(model, warm_batches, warm_plan.arrays, out)),
            "extract": (lambda out: run_extract(model, prompts, out, args.batch_size, args.dtype),
                        lambda out: run_extract(model, warm_prompts, out, args.batch_size, args.dtype)),
        }
        # the same extract with zarr-python writing the chunks (--writer zarr)
        contenders["extract_zarr_writer"] = (
            lambda out: run_extract(model, prompts, out, args.batch_size, args.dtype, "zarr"),
            lambda out: run_extract(model, warm_prompts, out, args.batch_size, args.dtype, "zarr"))
        with torch.inference_mode():  # the bare copy computes what the bridge computes
            ids = warm_batches[0][0]
            ref = bare_model(ids, use_cache=False).logits
            got = model.bridge(ids, use_cache=False)
        print(f"check bare copy vs bridge logits: max |diff| {float((ref - got).abs().max()):.3g}; "
              f"bare GDN module {type(bare_model.model.layers[0].linear_attn).__name__}, bridge's "
              f"{type(model.hf_model.model.layers[0].linear_attn).__name__}")
        for name, (_, warm) in contenders.items():
            out = tmp / f"warm_{name}.zarr"
            warm(out)
            shutil.rmtree(out, ignore_errors=True)

        times: dict[str, list[float]] = {name: [] for name in contenders}
        stalls: dict[str, list[str]] = {name: [] for name in contenders}
        for r in range(args.repeats):
            last = r == args.repeats - 1
            names = list(contenders)
            order = names[r % len(names):] + names[:r % len(names)]  # rotate: nobody always follows the same peer
            for name in order:
                fn = contenders[name][0]
                out = tmp / f"{name}.zarr"
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # flush the previous contender's dirty pages so its writeback is not timed here
                p0, t = pressure(), time.perf_counter()
                fn(out)
                times[name].append(time.perf_counter() - t)
                p1 = pressure()
                stalls[name].append(" ".join(f"{k} {p1[k] - p0[k]:.1f}" for k in p1 if k in p0))
                if not last:
                    shutil.rmtree(out, ignore_errors=True)
            print(f"round {r + 1}: " + ", ".join(
                f"{n} {times[n][-1]:.2f} s" + (f" (stall s: {stalls[n][-1]})" if stalls[n][-1] else "")
                for n in contenders), flush=True)

        med = {name: statistics.median(ts) for name, ts in times.items()}
        bare = med["bare_forward"]
        print()
        best = {name: min(ts) for name, ts in times.items()}
        print(f"load average at the end: {os.getloadavg()[0]:.2f} (1 min)")
        print(f"{'contender':<14}{'seconds':>10}{'tokens/s':>12}{'x bare':>9}{'min s':>9}"
              f"{'x bare(min)':>13}   runs (s)")
        for name, s in med.items():
            runs = " ".join(f"{t:.2f}" for t in times[name])
            print(f"{name:<14}{s:>10.2f}{n_tokens / s:>12.0f}{bare / s:>9.2f}{best[name]:>9.2f}"
                  f"{best['bare_forward'] / best[name]:>13.2f}   {runs}")
        print("(seconds, tokens/s and x bare from the median run; min s and x bare(min) from the fastest)")
        print()
        print(f"extract / bare = {bare / med['extract']:.2f}  (tokens/s ratio)")
        print(f"extract / naive = {med['naive'] / med['extract']:.2f}  (tokens/s ratio)")
        print(f"extract --writer zarr / bare = {bare / med['extract_zarr_writer']:.2f}; default writer "
              f"(tensorstore) / zarr writer = {med['extract_zarr_writer'] / med['extract']:.2f}")
        print("target: extract >= 0.85x bare, and > naive")
        ok = bare / med["extract"] >= 0.85 and med["extract"] < med["naive"]
        print(f"target met: {'yes' if ok else 'NO'}")

        check_same(tmp / "naive.zarr", tmp / "extract.zarr", hooks, token_lists)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_same(naive_path: Path, extract_path: Path, hooks, token_lists) -> None:
    """Like-for-like check: one vector hook and one scalar hook hold identical values in both."""
    import zarr

    naive = zarr.open_group(str(naive_path), mode="r")
    ext = zarr.open_group(str(extract_path), mode="r")
    picks = [next(h for h in hooks if h.short == "recurrence_out"),
             next(h for h in hooks if h.scalar)]
    tokens_equal = np.array_equal(naive["tokens"][:], ext["tokens"][:]) and np.array_equal(
        ext["tokens"][:], np.concatenate([np.asarray(t, dtype=np.int32) for t in token_lists]))
    for hook in picks:
        a, b = naive[hook.name][:], ext[hook.name][:]
        same = a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
        diff = (float(np.max(np.abs(a.astype(np.float32) - b.astype(np.float32))))
                if a.shape == b.shape else float("nan"))
        print(f"check {hook.name}: naive {a.shape} {a.dtype} vs extract {b.shape} {b.dtype}: "
              f"{'identical' if same else 'DIFFERENT'} (max |diff| {diff:.3g}); tokens equal: {tokens_equal}")


if __name__ == "__main__":
    main()
