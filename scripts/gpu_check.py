"""GPU check on a 0.8B-shaped random Qwen3.5 in bfloat16 (run by scripts/gpu_check.sh).

1. Kernels: flash-linear-attention's chunk kernel against transformers' torch reference, directly in
   float32 and through the bridge (every GDN layer's ``hook_recurrence_out``) in bfloat16.
2. Extraction on CUDA: the store of a padded, batched run against the bridge's ``run_with_cache``
   of each prompt alone.
3. Speed: bare forward tokens/s (the trunk without the unembed, and the whole model), extract
   tokens/s with the default hooks, device-to-host GB/s (pinned and pageable), the disk's
   sequential write MB/s with fsync, and the target ratio of the issue.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdn_dump.models import (  # noqa: E402
    ATTENTION_LAYER_TYPE,
    GDN_LAYER_TYPE,
    build_tiny_tokenizer,
    select_kernels,
    wrap_model,
)

QWEN35_08B = dict(  # published shapes (DESIGN.md section 2)
    hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
    layer_types=([GDN_LAYER_TYPE] * 3 + [ATTENTION_LAYER_TYPE]) * 6,
    num_attention_heads=8, num_key_value_heads=2, head_dim=256,
    linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_conv_kernel_dim=4, vocab_size=248320,
    max_position_embeddings=32768, tie_word_embeddings=True,
)


def log(*args):
    print(*args, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def build(device, kernels):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    tokenizer = build_tiny_tokenizer()
    config = Qwen3_5TextConfig(pad_token_id=tokenizer.pad_token_id, **QWEN35_08B)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3_5ForCausalLM(config)
    return wrap_model(model, tokenizer, name="qwen3.5-0.8b-random", device=device,
                      dtype=torch.bfloat16, kernels=kernels)


def bridge_agreement(model, device):
    ids = torch.randint(0, 250, (2, 700), device=device)
    names = [f"blocks.{i}.linear_attn.hook_recurrence_out"
             for i, t in enumerate(model.config.layer_types) if t == GDN_LAYER_TYPE]
    outs = {}
    for backend in ("auto", "torch"):
        log(f"  bridge forward with kernels={select_kernels(device, backend)}")
        with torch.inference_mode():
            _, cache = model.bridge.run_with_cache(ids, names_filter=names, use_cache=False)
        outs[backend] = cache
    select_kernels(device, "auto")
    worst = max(rel(outs["auto"][n], outs["torch"][n]) for n in names)
    log(f"bridge bfloat16, {len(names)} GDN layers: hook_recurrence_out fla vs torch, worst relative "
        f"error {worst:.2e}")


def extract_agreement(model, tmp: Path):
    import zarr

    from gdn_dump.pipeline import ExtractOptions, extract

    rng = np.random.default_rng(0)
    prompts = tmp / "check.txt"
    prompts.write_text("\n".join("".join(rng.choice(list("abcdefgh "), size=n))
                                 for n in (5, 300, 777, 64, 1500)) + "\n")
    extract(ExtractOptions(model=model.name, prompts=str(prompts), out=str(tmp / "check.zarr"),
                           dtype="float32", batch_size=5), model=model)
    group = zarr.open_group(str(tmp / "check.zarr"), mode="r")
    worst = 0.0
    for p, line in enumerate(prompts.read_text().splitlines()):
        ids = torch.tensor([model.tokenizer(line)["input_ids"]], device=model.device)
        with torch.inference_mode():
            _, cache = model.bridge.run_with_cache(ids, use_cache=False)
        s, n = int(group["prompt_start"][p]), int(group["prompt_length"][p])
        for name in group.attrs["gdn_dump"]["hooks"]:
            worst = max(worst, rel(torch.from_numpy(group[name][s:s + n]), cache[name][0].cpu()))
    log(f"extract on CUDA (batched, padded, bfloat16 model, float32 storage) vs run_with_cache of "
        f"each prompt alone: worst relative error {worst:.2e} over every default hook")


def speed(model, tmp: Path, args):
    from gdn_dump.pipeline import ExtractOptions, extract
    from gdn_dump.plan import format_bytes

    device = model.device
    n_tokens = args.batches * args.batch_size * args.seq_len
    ids = torch.randint(0, 250, (args.batch_size, args.seq_len), device=device)
    with torch.inference_mode():
        trunk = timed(lambda: [model.hf_model.model(ids, use_cache=False) for _ in range(args.batches)], 2)
        whole = timed(lambda: [model.hf_model(ids, use_cache=False) for _ in range(args.batches)], 2)
    log(f"bare forward, trunk (no unembed): {n_tokens / trunk:,.0f} tokens/s")
    log(f"bare forward, whole model (with logits): {n_tokens / whole:,.0f} tokens/s")

    rng = np.random.default_rng(1)
    prompts = tmp / "speed.txt"
    prompts.write_text("\n".join("".join(rng.choice(list("abcdefgh"), size=args.seq_len))
                                 for _ in range(args.batches * args.batch_size)) + "\n")
    opts = ExtractOptions(model=model.name, prompts=str(prompts), out=str(tmp / "speed.zarr"),
                          batch_size=args.batch_size, overwrite=True, force=True)
    result = extract(opts, model=model)
    per_token = result.plan.bytes_per_token
    log(f"extract, default hooks, float16 storage: {result.tokens / result.seconds:,.0f} tokens/s, "
        f"{result.bytes_written / result.seconds / 1e6:,.0f} MB/s written "
        f"({format_bytes(per_token)} per token, {format_bytes(result.bytes_written)} in "
        f"{result.seconds:.1f} s)")

    size = 1 << 30
    src = torch.empty(size // 2, dtype=torch.bfloat16, device=device)
    pinned = torch.empty(size // 2, dtype=torch.bfloat16, pin_memory=True)
    pageable = torch.empty(size // 2, dtype=torch.bfloat16)
    t_pinned = timed(lambda: pinned.copy_(src, non_blocking=True), 3)
    t_pageable = timed(lambda: pageable.copy_(src), 3)
    log(f"device-to-host: pinned {size / t_pinned / 1e9:.1f} GB/s, pageable {size / t_pageable / 1e9:.1f} GB/s")

    disk_bytes = min(result.bytes_written, 4 << 30)
    block = np.random.default_rng(2).bytes(64 << 20)
    t0 = time.perf_counter()
    with open(tmp / "dd.bin", "wb") as f:
        written = 0
        while written < disk_bytes:
            f.write(block)
            written += len(block)
        f.flush()
        os.fsync(f.fileno())
    disk = written / (time.perf_counter() - t0)
    (tmp / "dd.bin").unlink()
    log(f"disk sequential write with fsync: {disk / 1e6:,.0f} MB/s")
    bound = min(n_tokens / trunk, disk / per_token)
    achieved = result.tokens / result.seconds
    log(f"target: extract >= 80% of min(bare trunk {n_tokens / trunk:,.0f}, disk/bytes-per-token "
        f"{disk / per_token:,.0f}) = {bound:,.0f} tokens/s -> {achieved / bound:.0%}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    args = parser.parse_args()
    device = torch.device("cuda")
    log(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
        f"date {time.strftime('%Y-%m-%d %H:%M:%S')}")
    import fla
    import transformers
    import zarr
    log(f"transformers {transformers.__version__}, fla {getattr(fla, '__version__', '?')}, zarr {zarr.__version__}")
    tmp = Path(tempfile.mkdtemp(dir=args.tmp))
    kernel_agreement(device)
    model = build(device, "auto")
    log(f"model: 0.8B-shaped random Qwen3.5, bfloat16, kernels={model.kernel_backend}")
    bridge_agreement(model, device)
    extract_agreement(model, tmp)
    speed(model, tmp, args)


if __name__ == "__main__":
    main()
