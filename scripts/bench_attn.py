"""Benchmark: seconds per GDN layer for the effective-attention methods, side by side on one machine.

One layer shaped like Qwen3.5-0.8B's GDN (16 key heads, 16 value heads, d_k 128), batch 1, float32,
for each prompt length L. Methods:

- ``closed_form``: :func:`gdn_effective_attention` ``method="closed_form"`` (triangular solve, O(L^3)).
- ``chunked``: ``method="chunked"`` (identity-value chunked kernel; on CPU our torch kernel).
- ``heuristic``: TransformerLens's heuristic (not exact; the speed reference, ratio 1.00).
- ``hf_chunk_eye``: transformers' generic ``torch_chunk_gated_delta_rule`` fed identity values
  ``[1, L, H, L]``: the obvious exact peer.

Each is warmed up once, then timed ``--repeats`` times round-robin; the median is printed with its
ratio to the heuristic.

``--contributions`` times instead, per length (default 256, 1024, 2048), what ``gdn-dump
contributions`` adds per layer beside the exact matrix, and the plain matrix product that bounds it:

- ``matrix``: the exact matrix alone (``chunked``, as above), ``M`` ``[16, L, L]``.
- ``contrib``: norms and logits (:func:`contribution_norms`, :func:`contribution_logits`) of all 16
  heads from a given ``M``, ``v``, ``gate``, ``w_out`` ``[1024, 16 * 128]`` and ``unembed``
  ``[L, 1024]``, one block of ``--contrib-rows`` query rows against its ``top + rows`` key columns at a
  time, as the pipeline hands them over (its tiles of ``ATTENTION_TILE`` rows).
- ``block_mm``: ``torch.matmul`` alone of the same blocks' dominant products, ``[rows, P] x [P, top + rows]``
  per head (``P = 128 * 129 / 2 = 8256``): the floor of ``contrib`` with these shapes.
- ``matmul``: ``torch.matmul`` ``[L, P] x [P, L]`` float32, 16 times (one per head).

Each cell gives the median seconds, the arithmetic (matrix-product FLOPs as
``torch.utils.flop_counter`` counts them in one untimed call; elementwise work and the small
triangular solves are not counted) and GFLOP/s; the last column is contrib's GFLOP/s over matmul's,
both measured in the same rounds (target >= 0.5).

On a shared machine another job's CPU use slows every thread barrier, and op-heavy code far more
than op-light code, so each call also measures how much CPU *other* processes took meanwhile
(from /proc/stat); a call where they took more than ``--max-interference`` of the machine is retried
(up to ``--retries`` times) and, if never clean, kept but flagged ``*``.
Run::

    python scripts/bench_attn.py [--lengths 256 512 1024 2048] [--repeats 3]
    python scripts/bench_attn.py --contributions [--lengths 256 1024 2048] [--contrib-rows 256]
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
from gdn_dump.ops.contributions import (contribution_logits, contribution_norms,  # noqa: E402
                                        gated_rmsnorm_gate)

N_K_HEADS, N_V_HEADS, D_K = 16, 16, 128
D_V, D_MODEL = 128, 1024  # Qwen3.5-0.8B's value head and residual widths
P_PAIRS = D_V * (D_V + 1) // 2  # the inner dimension of the norms' product
CONTRIB_ROWS = 256  # query rows per block: the store's ATTENTION_TILE, the pipeline's blocks


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


def make_contribution_inputs(L: int, seed: int = 0):
    """What the contributions of one layer start from: the exact ``M`` ``[16, L, L]`` (chunked),
    ``v`` and the gated RMSNorm's ``gate`` ``[L, 16, 128]``, ``w_out`` ``[1024, 2048]``, ``unembed`` ``[L, 1024]``."""
    q, k, beta, g = make_inputs(L, seed)
    M = gdn_effective_attention(q, k, beta, g, method="chunked")[0]
    gen = torch.Generator().manual_seed(seed + 1)
    v = torch.randn(L, N_V_HEADS, D_V, generator=gen)
    o, z = torch.randn(L, N_V_HEADS, D_V, generator=gen), torch.randn(L, N_V_HEADS, D_V, generator=gen)
    gate = gated_rmsnorm_gate(o, z, torch.ones(D_V), 1e-6)
    w_out = torch.randn(D_MODEL, N_V_HEADS * D_V, generator=gen) / (N_V_HEADS * D_V) ** 0.5
    unembed = torch.randn(L, D_MODEL, generator=gen)
    return M, v, gate, w_out, unembed


def contributions_by_blocks(M, v, gate, w_out, unembed, rows: int = CONTRIB_ROWS):
    """Norms and logits of every head, a block of ``rows`` query rows against its ``top + rows``
    key columns at a time (as the pipeline calls them); returns the last block's."""
    L = M.shape[-1]
    for top in range(0, L, rows):
        cols = min(top + rows, L)
        block, vs, gs = M[:, top:cols, :cols], v[:cols], gate[top:cols]
        out = contribution_norms(block, vs, gs, w_out), contribution_logits(block, vs, gs, w_out, unembed[top:cols])
    return out


def block_matmuls(L: int, rows: int = CONTRIB_ROWS, seed: int = 0):
    """``(fn, inputs)``: ``torch.matmul`` ``[r, P] x [P, top + r]`` per head for every block of
    :func:`contributions_by_blocks` (the dominant products alone)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(min(rows, L), P_PAIRS, generator=gen), torch.randn(P_PAIRS, L, generator=gen)

    def fn(a, b):
        for top in range(0, L, rows):
            cols = min(top + rows, L)
            for _ in range(N_V_HEADS):
                out = torch.matmul(a[:cols - top], b[:, :cols])
        return out

    return fn, (a, b)


def dense_matmul(a, b):
    """``[L, P] x [P, L]`` once per head."""
    for _ in range(N_V_HEADS):
        out = torch.matmul(a, b)
    return out


def counted_flops(fn, inputs) -> int:
    """Matrix-product FLOPs of one call, as ``torch.utils.flop_counter`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops()


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
    ``inputs``: one tuple for all methods, or a dict of a tuple per method.
    """
    args = inputs if isinstance(inputs, dict) else dict.fromkeys(methods, inputs)
    for name, fn in methods.items():
        fn(*args[name])
    times: dict[str, list[tuple[float, bool]]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            for _attempt in range(retries + 1):
                wall, interference = timed_call(fn, args[name])
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


CONTRIB_COLUMNS = ("matrix", "contrib", "block_mm", "matmul")


def contrib_cell(seconds: float, clean: bool, flops: int) -> str:
    return f"{seconds:>8.3f}s{' ' if clean else '*'} {flops / 1e9:>7.1f} {flops / seconds / 1e9:>6.1f}"


def contributions_table(args) -> None:
    """The ``--contributions`` section: matrix, contrib, block_mm, matmul per length (see the module)."""
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32; {N_V_HEADS} heads, "
          f"d_v {D_V}, d_model {D_MODEL}, P = {P_PAIRS}; contrib in blocks of {args.contrib_rows} query rows; "
          f"median of {args.repeats} after 1 warm-up")
    print(f"load average at start: {loadavg()}")
    top = f"{'':>6} " + " ".join(f"{c:^24}" for c in CONTRIB_COLUMNS) + f" {'contrib GF/s':>13}"
    header = (f"{'L':>6} " + " ".join(f"{'seconds':>10} {'GFLOP':>7} {'GF/s':>6}" for _ in CONTRIB_COLUMNS)
              + f" {'/ matmul GF/s':>13}")
    print(top)
    print(header)
    print("-" * len(header))
    fastest, ratios = {}, {}
    for L in args.lengths:
        q, k, beta, g = make_inputs(L)
        given = make_contribution_inputs(L)
        block_fn, block_inputs = block_matmuls(L, args.contrib_rows)
        gen = torch.Generator().manual_seed(2)
        dense_inputs = (torch.randn(L, P_PAIRS, generator=gen), torch.randn(P_PAIRS, L, generator=gen))
        rows = args.contrib_rows
        methods = {"matrix": METHODS["chunked"],
                   "contrib": lambda *x: contributions_by_blocks(*x, rows=rows),
                   "block_mm": block_fn, "matmul": dense_matmul}
        inputs = {"matrix": (q, k, beta, g), "contrib": given, "block_mm": block_inputs, "matmul": dense_inputs}
        flops = {name: counted_flops(fn, inputs[name]) for name, fn in methods.items()}
        times = time_methods(methods, inputs, args.repeats, args.max_interference, args.retries)
        for pick, store in ((statistics.median, None), (min, fastest)):
            secs = {m: summarize(c, pick) for m, c in times.items()}
            rate = {m: flops[m] / secs[m][0] for m in methods}
            ratio = rate["contrib"] / rate["matmul"]
            line = (f"{L:>6} " + " ".join(contrib_cell(*secs[m], flops[m]) for m in CONTRIB_COLUMNS)
                    + f" {ratio:>13.2f}")
            if store is None:
                ratios[L] = ratio
                print(line, flush=True)
            else:
                store[L] = line
        del given, dense_inputs, block_inputs
    print("median seconds per layer; GFLOP = matrix-product arithmetic of one call (torch.utils.flop_counter;")
    print("elementwise work and the chunked kernel's small triangular solves not counted); GF/s = GFLOP / seconds.")
    print("matrix: exact M alone (chunked); contrib: norms + logits of all heads from a given M, by blocks;")
    print("block_mm: torch.matmul of contrib's dominant products alone; matmul: [L, P] x [P, L] x 16 heads.")
    print(f"* = every timed call of that cell ran while other processes used > {args.max_interference:.0%} "
          "of the CPUs")
    print("fastest call instead of median:")
    for line in fastest.values():
        print(line)
    print("contrib GF/s / matmul GF/s (median): "
          + ", ".join(f"L={L} {r:.2f}" for L, r in ratios.items())
          + f"  (target >= 0.5; met: {'yes' if min(ratios.values()) >= 0.5 else 'NO'})")
    print(f"load average at end: {loadavg()}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="prompt lengths (default 256 512 1024 2048; with --contributions 256 1024 2048)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--max-interference", type=float, default=0.10,
                        help="share of the machine's CPUs other processes may use during a clean call")
    parser.add_argument("--retries", type=int, default=2, help="retries of a disturbed call")
    parser.add_argument("--contributions", action="store_true",
                        help="time the contributions (norms + logits) against the matrix and a plain matmul instead")
    parser.add_argument("--contrib-rows", type=int, default=CONTRIB_ROWS,
                        help="query rows per block of the contributions (the pipeline's ATTENTION_TILE)")
    args = parser.parse_args(argv)
    if args.contributions:
        args.lengths = args.lengths or [256, 1024, 2048]
        contributions_table(args)
        return
    args.lengths = args.lengths or [256, 512, 1024, 2048]

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
