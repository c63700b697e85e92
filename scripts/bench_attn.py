"""Benchmark: seconds per GDN layer for the effective-attention methods, side by side on one machine.

One layer shaped like Qwen3.5-0.8B's GDN (16 key heads, 16 value heads, d_k 128), batch 1, float32,
for each prompt length L. Methods:

- ``closed_form``: :func:`gdn_effective_attention` ``method="closed_form"`` (triangular solve, O(L^3)).
- ``chunked``: ``method="chunked"`` (identity-value chunked kernel; on CPU our torch kernel).
- ``heuristic``: TransformerLens's heuristic (not exact; the speed reference, ratio 1.00).
- ``hf_chunk_eye``: transformers' generic ``torch_chunk_gated_delta_rule`` fed identity values
  ``[1, L, H, L]``: the obvious exact peer.

Each is warmed up once, then timed ``--repeats`` times round-robin; the median is printed with its
ratio to the heuristic. On a shared machine another job's CPU use slows every thread barrier, and
op-heavy code far more than op-light code, so each call also measures how much CPU *other*
processes took meanwhile (from /proc/stat); a call where they took more than ``--max-interference``
of the machine is retried (up to ``--retries`` times) and, if never clean, kept but flagged ``*``.
Run::

    python scripts/bench_attn.py [--lengths 256 512 1024 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gdn_dump.ops.attention import gdn_effective_attention, heuristic_effective_attention  # noqa: E402

N_K_HEADS, N_V_HEADS, D_K = 16, 16, 128


def make_inputs(L: int, seed: int = 0):
    """Random hook tensors of a 0.8B-shaped layer: q, k ``[1, L, 16, 128]``; beta, g ``[1, L, 16]``."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, L, N_K_HEADS, D_K, generator=gen)
    k = torch.randn(1, L, N_K_HEADS, D_K, generator=gen)
    beta = torch.randn(1, L, N_V_HEADS, generator=gen).sigmoid()
    # Qwen-like decays: g = -exp(A_log) * softplus(a + dt_bias)
    g = -F.softplus(torch.randn(1, L, N_V_HEADS, generator=gen)) * torch.randn(N_V_HEADS, generator=gen).exp()
    return q, k, beta, g


def hf_chunk_eye(q, k, beta, g):
    """transformers' generic chunked kernel with identity values; returns M ``[B, Hv, L, L]``."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    B, L = q.shape[:2]
    Hv = beta.shape[-1]
    v = torch.eye(L)[None, :, None, :].expand(B, L, Hv, L)
    o, _ = torch_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=False,
                                        use_qk_l2norm_in_kernel=True)
    return o.transpose(1, 2)


METHODS = {
    "closed_form": lambda q, k, b, g: gdn_effective_attention(q, k, b, g, method="closed_form"),
    "chunked": lambda q, k, b, g: gdn_effective_attention(q, k, b, g, method="chunked"),
    "heuristic": heuristic_effective_attention,
    "hf_chunk_eye": hf_chunk_eye,
}


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes have used so far (from /proc/stat), or None where unreadable."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def timed_call(fn, inputs) -> tuple[float, float]:
    """(wall seconds, share of the machine's CPUs that other processes used meanwhile)."""
    busy0, own0, t0 = machine_busy_seconds(), time.process_time(), time.perf_counter()
    out = fn(*inputs)
    wall, own = time.perf_counter() - t0, time.process_time() - own0
    busy1 = machine_busy_seconds()
    del out
    if busy0 is None or busy1 is None:
        return wall, 0.0
    return wall, max(0.0, busy1 - busy0 - own) / (wall * (os.cpu_count() or 1))


def time_methods(methods: dict, inputs, repeats: int, max_interference: float, retries: int):
    """Per method, ``repeats`` (seconds, clean) pairs: one warm-up each, then round-robin rounds.

    Round-robin rather than method after method, so that a burst of load from elsewhere lands on all
    methods alike; a call disturbed by more than ``max_interference`` is retried up to ``retries`` times.
    """
    for fn in methods.values():
        fn(*inputs)
    times: dict[str, list[tuple[float, bool]]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            for _attempt in range(retries + 1):
                wall, interference = timed_call(fn, inputs)
                if interference <= max_interference:
                    break
            times[name].append((wall, interference <= max_interference))
    return times


def summarize(calls: list[tuple[float, bool]], pick) -> tuple[float, bool]:
    """``pick`` (median or min) over the clean calls, else over all calls flagged not clean."""
    clean = [t for t, ok in calls if ok]
    return (pick(clean), True) if clean else (pick([t for t, _ in calls]), False)


def row(L: int, secs: dict[str, tuple[float, bool]]) -> str:
    """One table line: seconds per method and the ratio to the heuristic; ``*`` marks a disturbed value."""
    base = secs["heuristic"][0] if "heuristic" in secs else None
    cells = [f"{s:>11.4f}s{' ' if ok else '*'}" + (f"({s / base:5.2f}x)" if base else "")
             for s, ok in secs.values()]
    return f"{L:>6} " + " ".join(f"{c:>22}" for c in cells)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--max-interference", type=float, default=0.10,
                        help="share of the machine's CPUs other processes may use during a clean call")
    parser.add_argument("--retries", type=int, default=2, help="retries of a disturbed call")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, batch 1, "
          f"{N_K_HEADS} k-heads / {N_V_HEADS} v-heads, d_k {D_K}; median of {args.repeats} after 1 warm-up")
    print(f"load average at start: {loadavg()}")
    header = f"{'L':>6} " + " ".join(f"{m:>22}" for m in args.methods)
    print(header)
    print("-" * len(header))
    fastest = {}
    for L in args.lengths:
        times = time_methods({m: METHODS[m] for m in args.methods}, make_inputs(L), args.repeats,
                             args.max_interference, args.retries)
        print(row(L, {m: summarize(c, statistics.median) for m, c in times.items()}), flush=True)
        fastest[L] = {m: summarize(c, min) for m, c in times.items()}
    print("median seconds per layer (ratio to heuristic); closed_form and chunked are exact, heuristic is not.")
    print(f"* = every timed call of that cell ran while other processes used > {args.max_interference:.0%} "
          "of the CPUs")
    print("fastest call instead of median:")
    for L, secs in fastest.items():
        print(row(L, secs))
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
