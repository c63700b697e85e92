"""GPU check on a 0.8B-shaped random Qwen3.5 in bfloat16 (run by scripts/gpu_check.sh).

1. Kernels: flash-linear-attention's chunk kernel against transformers' torch reference, directly in
   float32 and through the bridge (every GDN layer's ``hook_recurrence_out``) in bfloat16.
2. Extraction on CUDA: the store of a padded, batched run against the bridge's ``run_with_cache``
   of each prompt alone.
3. Speed: bare forward tokens/s (the trunk without the unembed, and the whole model), the bridge's
   ``run_with_cache`` with the default hooks (no writes), extract tokens/s with the default hooks,
   device-to-host GB/s (pinned and pageable), the disk's sequential write MB/s with fsync, and the
   target ratio of the issue.

Each stage runs on its own: one that fails prints its traceback and the next one still runs, since
a GPU lease is short. ``--device cpu --small`` is a dry run of the whole script on the CPU (no fla)
with a small model, to shake it out before a lease.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdn_dump.run.capture import pad_batch  # noqa: E402
from gdn_dump.catalogue import ATTENTION_LAYER_TYPE, GDN_LAYER_TYPE  # noqa: E402
from gdn_dump.model.kernels import select_kernels  # noqa: E402
from gdn_dump.model.load import wrap_model  # noqa: E402
from gdn_dump.tokenizer import build_tiny_tokenizer  # noqa: E402

QWEN35_08B = dict(  # published shapes (DESIGN.md section 2)
    hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
    layer_types=([GDN_LAYER_TYPE] * 3 + [ATTENTION_LAYER_TYPE]) * 6,
    num_attention_heads=8, num_key_value_heads=2, head_dim=256,
    linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_conv_kernel_dim=4, vocab_size=248320,
    max_position_embeddings=262144, tie_word_embeddings=True,
)


def log(*args):
    print(*args, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call (Triton compiles and autotunes
    on first use)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def stage(name: str, fn, *args):
    log(f"== {name} ==")
    t0 = time.perf_counter()
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - report and go on to the next stage
        log(f"STAGE FAILED: {name}\n{traceback.format_exc()}")
        return None
    finally:
        log(f"   ({name}: {time.perf_counter() - t0:.1f} s)")


def kernel_agreement(device):
    import transformers.models.qwen3_5.modeling_qwen3_5 as modeling
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    select_kernels(device, "torch")
    reference = modeling.torch_chunk_gated_delta_rule
    torch.manual_seed(0)
    B, T, H, K = 2, 1000, 16, 128
    q, k, v = (torch.randn(B, T, H, K, device=device) for _ in range(3))
    g = -torch.nn.functional.softplus(torch.randn(B, T, H, device=device))
    beta = torch.rand(B, T, H, device=device)
    ref, _ = reference(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    fla, _ = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    log(f"kernel float32 [B={B}, T={T}, H={H}, K={K}]: fla vs torch relative error {rel(fla, ref):.2e}")


def build(device, kernels, small: bool):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    tokenizer = build_tiny_tokenizer()
    shapes = dict(QWEN35_08B, **(SMALL if small else {}))
    config = Qwen3_5TextConfig(pad_token_id=tokenizer.pad_token_id, **shapes)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3_5ForCausalLM(config)
    return wrap_model(model, tokenizer, name="qwen3.5-0.8b-random", device=device,
                      dtype=torch.bfloat16, kernels=kernels)


def gdn_names(model, suffix: str) -> list[str]:
    return [f"blocks.{i}.linear_attn.{suffix}"
            for i, t in enumerate(model.config.layer_types) if t == GDN_LAYER_TYPE]


def bridge_agreement(model, device):
    ids = torch.randint(0, 250, (2, 700), device=device)
    names = gdn_names(model, "hook_recurrence_out")
    outs = {}
    for backend in ("auto", "torch"):
        log(f"  bridge forward with kernels={select_kernels(device, backend)}")
        with torch.inference_mode():
            _, cache = model.bridge.run_with_cache(ids, names_filter=names, use_cache=False)
        outs[backend] = cache
    select_kernels(device, "auto")
    worst = max(rel(outs["auto"][n], outs["torch"][n]) for n in names)
    log(f"bridge bfloat16, {len(names)} GDN layers: hook_recurrence_out {model.kernel_backend} vs "
        f"torch, worst relative error {worst:.2e}")


def extract_agreement(model, tmp: Path):
    import zarr

    from gdn_dump.run.options import ExtractOptions
    from gdn_dump.run.pipeline import extract

    rng = np.random.default_rng(0)
    prompts = tmp / "check.txt"
    prompts.write_text("\n".join("".join(rng.choice(list("abcdefgh "), size=n))
                                 for n in (5, 300, 777, 64, 1500)) + "\n")
    # file order (no length sorting): the batch below is then the very batch extract ran
    result = extract(ExtractOptions(model=model.name, prompts=str(prompts), out=str(tmp / "check.zarr"),
                                    dtype="float32", batch_size=5, sort_window_bytes=0), model=model)
    group = zarr.open_group(str(tmp / "check.zarr"), mode="r")
    names = group.attrs["gdn_dump"]["hooks"]
    lines = prompts.read_text().splitlines()
    # The same padded batch through run_with_cache: the same kernels on the same shapes.
    padded, lengths = pad_batch([model.tokenizer(line)["input_ids"] for line in lines],
                                model.tokenizer.pad_token_id)
    with torch.inference_mode():
        _, batch_cache = model.bridge.run_with_cache(padded.to(model.device), names_filter=names,
                                                     use_cache=False)
    worst, worst_same, worst_name = 0.0, 0.0, ""
    per_layer: dict[int, float] = {}
    for p, line in enumerate(lines):
        ids = torch.tensor([model.tokenizer(line)["input_ids"]], device=model.device)
        with torch.inference_mode():
            _, cache = model.bridge.run_with_cache(ids, names_filter=names, use_cache=False)
        s, n = int(group["prompt_start"][p]), int(group["prompt_length"][p])
        for name in names:
            stored = torch.from_numpy(group[name][s:s + n])
            worst_same = max(worst_same, rel(stored, batch_cache[name][p, :n].cpu()))
            err = rel(stored, cache[name][0].cpu())
            layer = int(name.split(".")[1])
            per_layer[layer] = max(per_layer.get(layer, 0.0), err)
            if err > worst:
                worst, worst_name = err, name
    log(f"extract on {model.device.type} vs run_with_cache of the same padded batch: worst relative "
        f"error {worst_same:.2e}")
    log("vs each prompt alone, worst per layer (growing with depth = rounding amplified): "
        + ", ".join(f"{layer}: {err:.1e}" for layer, err in sorted(per_layer.items())))
    # the statistics were reduced on the device (stats_device): against numpy over the stored rows
    from gdn_dump.ops.stats_reference import reference_stats as naive

    stats_worst = 0.0
    for name in names:
        arr = group[name]
        rows = np.concatenate([arr[int(s):int(s) + int(n)] for s, n in
                               zip(group["prompt_start"][:], group["prompt_length"][:])])
        got, want = arr.attrs["stats"], naive(rows, arr.metadata.dimension_names, name)
        for key in ("mean", "std", "mean_l2", "min", "max"):
            a, b = np.array(got[key], float), np.array(want[key], float)
            stats_worst = max(stats_worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30))))
        assert got["count"] == want["count"], name
    log(f"statistics reduced on the device vs numpy float64 over the stored rows: worst relative "
        f"difference {stats_worst:.2e} (counts equal)")
    log(f"extract on {model.device.type} (batched, padded, bfloat16 model, float32 storage, status "
        f"{result.status}) vs run_with_cache of each prompt alone: worst relative error "
        f"{worst:.2e} over every default hook ({worst_name}; bfloat16 rounding that differs with "
        f"the batch shape, compounded over the layers)")


def states_agreement(model, tmp: Path, args):
    """The state snapshots on CUDA (bfloat16 model, the chunked torch form on the device) against the
    float64 per-token reference on the same forward's rows, and their cost next to the same run
    without states."""
    from gdn_dump import open_store
    from gdn_dump.ops.states_reference import snapshot_states_naive
    from gdn_dump.run.options import ExtractOptions
    from gdn_dump.run.pipeline import extract

    rng = np.random.default_rng(1)
    prompts = tmp / "states.txt"
    prompts.write_text("\n".join("".join(rng.choice(list("abcdefgh "), size=n))
                                 for n in (5, 300, 777, 64, 1500, 2048)) + "\n")
    opts = dict(model=model.name, prompts=str(prompts), dtype="float32", batch_size=3, overwrite=True)
    extract(ExtractOptions(out=str(tmp / "states.zarr"), hooks="k,v,beta,log_decay,ssm_state",
                           state_every=64, **opts), model=model)
    store = open_store(tmp / "states.zarr")
    worst = 0.0
    for p in store.visible:
        for layer in store.state_layers:
            positions, states = store.states(p, layer)
            rec = store.prompt(p)
            rows = [torch.from_numpy(rec[f"blocks.{layer}.linear_attn.hook_{h}"])[None]
                    for h in ("k", "v", "beta", "log_decay")]
            pairs = torch.stack([torch.zeros_like(torch.from_numpy(positions)),
                                 torch.from_numpy(positions)], 1)
            ref = snapshot_states_naive(*rows, pairs, precision="float64")
            worst = max(worst, rel(torch.from_numpy(states).double(), ref))
    log(f"state snapshots on {model.device.type} (torch chunked form) vs the float64 per-token loop "
        f"on the stored float32 rows: worst relative error {worst:.2e}")
    times = {}
    for label, hooks in (("default", None), ("default+states", "default,ssm_state")):
        out = str(tmp / f"{label}.zarr")
        times[label] = timed(lambda: extract(ExtractOptions(out=out, hooks=hooks, stats=True, **opts),
                                             model=model), args.repeats, model.device)
    log(f"extract with states every 64 / without: {times['default+states'] / times['default']:.2f}x "
        f"time ({times['default']:.2f} s vs {times['default+states']:.2f} s)")


def contributions_check(model, tmp: Path, args):
    """``attn-matrix`` and ``contributions`` on the device with the (bfloat16) model: status and the
    residuals against the model dtype's limit (store.finalize.limit_for); then the contribution
    path's throughput on the device beside a plain matmul of the dominant product's shape
    (scripts/bench_attn.py's inputs, moved to the device)."""
    import zarr

    from gdn_dump.run.options import ExtractOptions
    from gdn_dump.run.pipeline import extract

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_attn

    rng = np.random.default_rng(2)
    prompts = tmp / "contrib.txt"
    prompts.write_text("\n".join("".join(rng.choice(list("abcdefgh "), size=n))
                                 for n in (5, 300, 777, 1500)) + "\n")
    types = model.config.layer_types
    layers = f"{types.index(GDN_LAYER_TYPE)},{types.index(ATTENTION_LAYER_TYPE)}"
    for command in ("attn-matrix", "contributions"):
        out = tmp / f"{command}.zarr"
        t0 = time.perf_counter()
        try:
            result = extract(ExtractOptions(model=model.name, prompts=str(prompts), out=str(out), hooks="",
                                            command=command, attn_layers=layers, overwrite=True),
                             model=model)
            status = result.status
        except Exception as exc:  # a failed check: report it, read the residuals anyway
            status = f"failed ({str(exc)[:160]})"
        seconds = time.perf_counter() - t0
        group = zarr.open_group(str(out), mode="r")
        checked = [(n, a.attrs) for n, a in group.arrays() if "residual_max" in a.attrs]
        log(f"{command} on {model.device.type}, layers {layers}: {status}, {seconds:.2f} s; "
            + "; ".join(f"{n} residual max {a['residual_max']:.2e} (limit {a['residual_limit']:g})"
                        for n, a in checked))
    device = model.device
    for L in (1024, 2048):
        M, v, gate, w_out, unembed = (x.to(device) for x in bench_attn.make_contribution_inputs(L))
        contrib = timed(lambda: bench_attn.contributions_by_blocks(M, v, gate, w_out, unembed),
                        args.repeats, device)
        a = torch.randn(L, bench_attn.P_PAIRS, device=device)
        b = torch.randn(bench_attn.P_PAIRS, L, device=device)
        dense = timed(lambda: bench_attn.dense_matmul(a, b), args.repeats, device)
        flops = bench_attn.counted_flops(bench_attn.contributions_by_blocks, (M, v, gate, w_out, unembed))
        dense_flops = 2 * L * L * bench_attn.P_PAIRS * bench_attn.N_V_HEADS
        log(f"L={L}: contributions (norms + logits, 16 heads) {contrib:.3f} s, {flops / contrib / 1e12:.1f} "
            f"TFLOP/s; matmul [L, P] x [P, L] x 16 {dense:.3f} s, {dense_flops / dense / 1e12:.1f} TFLOP/s; "
            f"ratio {(flops / contrib) / (dense_flops / dense):.2f}")


def long_context(model, tmp: Path, args):
    """One prompt of each ``--long-lengths`` tokens, default hooks of ``--long-layers``: peak device
    memory, tokens/s, bytes written (the GPU machine's 64 GiB disk holds about 11 GB of default
    hooks of three 0.8B-shaped GDN layers at 131,072 tokens, not all 18 layers')."""
    import resource

    from gdn_dump.run.options import ExtractOptions
    from gdn_dump.run.pipeline import extract
    from gdn_dump.store.layout import format_bytes

    for length in args.long_lengths:
        prompts = tmp / f"long-{length}.jsonl"
        ids = torch.randint(10, 200, (length,)).tolist()
        prompts.write_text(json.dumps({"text": model.tokenizer.decode(ids)}) + "\n")
        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(model.device)
        before = torch.cuda.memory_allocated(model.device) if model.device.type == "cuda" else 0
        t0 = time.perf_counter()
        result = extract(ExtractOptions(model=model.name, prompts=str(prompts), out=str(tmp / "long.zarr"),
                                        layers=args.long_layers, max_length=length, overwrite=True,
                                        force=True), model=model)
        seconds = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated(model.device) - before) if model.device.type == "cuda" else 0
        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        log(f"one prompt of {result.tokens} tokens, default hooks of layers {args.long_layers}: "
            f"{result.tokens / seconds:.0f} tokens/s, {format_bytes(result.bytes_written)} written, "
            f"peak device memory above the weights {format_bytes(peak)}, host peak RSS so far "
            f"{format_bytes(host)}, softmax attention {result.session.group.attrs['gdn_dump']['softmax_attention']}")
        shutil.rmtree(tmp / "long.zarr", ignore_errors=True)


def disk_write(tmp: Path, n_bytes: int) -> float:
    """Sequential write of ``n_bytes`` with one fsync at the end, in bytes/s (``dd`` with fsync)."""
    block = np.random.default_rng(2).bytes(64 << 20)
    t0 = time.perf_counter()
    with open(tmp / "dd.bin", "wb") as f:
        written = 0
        while written < n_bytes:
            f.write(block)
            written += len(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    (tmp / "dd.bin").unlink()
    return written / seconds


def speed(model, tmp: Path, args):
    from gdn_dump.catalogue import DEFAULT_HOOKS
    from gdn_dump.run.options import ExtractOptions
    from gdn_dump.run.pipeline import extract
    from gdn_dump.store.layout import format_bytes

    device = model.device
    n_tokens = args.batches * args.batch_size * args.seq_len
    ids = torch.randint(0, 250, (args.batch_size, args.seq_len), device=device)
    hooks = [name for hook in DEFAULT_HOOKS for name in gdn_names(model, f"hook_{hook}")]
    figures = {}

    def forward_trunk():
        for _ in range(args.batches):
            model.hf_model.model(ids, use_cache=False)

    def forward_whole():
        for _ in range(args.batches):
            model.hf_model(ids, use_cache=False)

    def bridge_in_memory():
        for _ in range(args.batches):
            _, cache = model.bridge.run_with_cache(ids, names_filter=hooks, use_cache=False,
                                                   return_type=None)
            del cache

    with torch.inference_mode():
        for name, fn in (("bare forward, trunk (no unembed)", forward_trunk),
                         ("bare forward, whole model (with logits)", forward_whole),
                         ("bridge run_with_cache, default hooks on device (no copies, no writes)",
                          bridge_in_memory)):
            figures[name] = n_tokens / timed(fn, args.repeats, device)
            log(f"{name}: {figures[name]:,.0f} tokens/s")

    rng = np.random.default_rng(1)
    prompts = tmp / "speed.txt"
    prompts.write_text("\n".join("".join(rng.choice(list("abcdefgh"), size=args.seq_len))
                                 for _ in range(args.batches * args.batch_size)) + "\n")
    opts = ExtractOptions(model=model.name, prompts=str(prompts), out=str(tmp / "speed.zarr"),
                          batch_size=args.batch_size, overwrite=True, force=True)
    runs = [extract(opts, model=model) for _ in range(1 + args.repeats)][1:]  # first: warm-up
    result = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
    per_token = result.plan.bytes_per_token
    achieved = result.tokens / result.seconds
    log(f"extract, default hooks, float16 storage: {achieved:,.0f} tokens/s, "
        f"{result.bytes_written / result.seconds / 1e6:,.0f} MB/s written "
        f"({format_bytes(per_token)} per token, {format_bytes(result.bytes_written)} in "
        f"{result.seconds:.2f} s; runs {' '.join(f'{r.seconds:.2f}' for r in runs)} s; peak RSS "
        f"{format_bytes(result.peak_rss)}, reorder peak {format_bytes(result.peak_held_bytes)})")

    size = 1 << 30
    src = torch.empty(size // 2, dtype=torch.bfloat16, device=device)
    pinned = torch.empty(size // 2, dtype=torch.bfloat16, pin_memory=device.type == "cuda")
    pageable = torch.empty(size // 2, dtype=torch.bfloat16)
    d2h_pinned = size / timed(lambda: pinned.copy_(src, non_blocking=True), 3, device)
    d2h_pageable = size / timed(lambda: pageable.copy_(src), 3, device)
    log(f"device-to-host: pinned {d2h_pinned / 1e9:.1f} GB/s, pageable {d2h_pageable / 1e9:.1f} GB/s")

    disk = disk_write(tmp, min(result.bytes_written, args.disk_bytes))
    log(f"disk sequential write with fsync: {disk / 1e6:,.0f} MB/s")
    trunk = figures["bare forward, trunk (no unembed)"]
    bridge = figures["bridge run_with_cache, default hooks on device (no copies, no writes)"]
    bound = min(trunk, disk / per_token)
    log(f"bounds in tokens/s: bare trunk {trunk:,.0f}; bridge in memory {bridge:,.0f}; "
        f"device-to-host {d2h_pinned / per_token:,.0f}; disk {disk / per_token:,.0f}")
    log(f"extract / bridge in memory = {achieved / bridge:.2f}; extract / bare trunk = "
        f"{achieved / trunk:.2f}; extract / disk-bound = {achieved / (disk / per_token):.2f}")
    log(f"TARGET: extract >= 80% of min(bare trunk, disk / bytes per token) = {bound:,.0f} tokens/s "
        f"-> {achieved / bound:.0%} ({'met' if achieved >= 0.8 * bound else 'NOT met'})")


def oom_halving(model, tmp: Path, args):
    """A real CUDA out-of-memory: cap this process's share of the GPU a little above what the
    weights take, run batches that do not fit, and check the run halves, retries and completes with
    the same values as an uncapped run."""
    import zarr

    from gdn_dump.run.options import ExtractOptions
    from gdn_dump.run.pipeline import extract

    device = model.device
    rng = np.random.default_rng(3)
    prompts = tmp / "oom.txt"
    prompts.write_text("\n".join("".join(rng.choice(list("abcdefgh"), size=args.oom_seq_len))
                                 for _ in range(16)) + "\n")

    def run(out: str):
        return extract(ExtractOptions(model=model.name, prompts=str(prompts), out=str(tmp / out),
                                      hooks="beta,log_decay,recurrence_out", layers="0,1",
                                      batch_size=16, overwrite=True), model=model)

    free = run("oom_free.zarr")
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    cap = torch.cuda.memory_allocated(device) + args.oom_headroom
    torch.cuda.set_per_process_memory_fraction(cap / total, device.index or 0)
    try:
        capped = run("oom_capped.zarr")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device.index or 0)
        torch.cuda.empty_cache()
    a, b = zarr.open_group(str(tmp / "oom_free.zarr"), mode="r"), zarr.open_group(str(tmp / "oom_capped.zarr"), mode="r")
    worst = max(rel(torch.from_numpy(b[n][:].astype(np.float32)), torch.from_numpy(a[n][:].astype(np.float32)))
                for n in a.attrs["gdn_dump"]["hooks"])
    log(f"out of memory with {args.oom_headroom / 2**30:.1f} GiB above the weights, 16 prompts of "
        f"{args.oom_seq_len} tokens in one batch: {capped.oom_retries} halving(s) (uncapped: "
        f"{free.oom_retries}), status {capped.status}; worst relative difference to the uncapped "
        f"store {worst:.2e}")


SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             layer_types=[GDN_LAYER_TYPE] * 3 + [ATTENTION_LAYER_TYPE], linear_num_key_heads=4,
             linear_num_value_heads=4, num_attention_heads=4, head_dim=64, vocab_size=1000)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--disk-bytes", type=int, default=4 << 30)
    parser.add_argument("--oom-seq-len", type=int, default=4096)
    parser.add_argument("--oom-headroom", type=int, default=3 << 30, help="bytes above the weights")
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a small model (dry run on the CPU)")
    parser.add_argument("--stages", default="kernel,bridge,extract,states,contrib,speed,long,oom",
                        help="comma-separated subset of kernel,bridge,extract,states,contrib,speed,long,oom")
    parser.add_argument("--long-lengths", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--long-layers", default="0-2", help="GDN layers of the long-context stage")
    args = parser.parse_args()
    device = torch.device(args.device)
    import transformers
    import zarr
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"device: {name}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"zarr {zarr.__version__}, date {time.strftime('%Y-%m-%d %H:%M:%S')}")
    tmp = Path(tempfile.mkdtemp(dir=args.tmp))
    stages = set(args.stages.split(","))
    if device.type == "cuda" and "kernel" in stages:
        stage("fla vs torch chunk kernel", kernel_agreement, device)
    model = stage("build the model", build, device, "auto", args.small)
    if model is None:
        return 1
    log(f"model: {'small' if args.small else '0.8B-shaped'} random Qwen3.5, bfloat16, "
        f"kernels={model.kernel_backend}")
    if "bridge" in stages:
        stage("bridge forward, active kernels vs torch", bridge_agreement, model, device)
    if "extract" in stages:
        stage("extract vs run_with_cache", extract_agreement, model, tmp)
    if "states" in stages:
        stage("state snapshots", states_agreement, model, tmp, args)
    if "contrib" in stages:
        stage("attention matrices and contributions", contributions_check, model, tmp, args)
    if "speed" in stages:
        stage("speed", speed, model, tmp, args)
    if "long" in stages:
        stage("long context", long_context, model, tmp, args)
    if device.type == "cuda" and "oom" in stages:
        stage("out-of-memory halving", oom_halving, model, tmp, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
