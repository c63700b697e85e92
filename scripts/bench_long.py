"""Long context (issue 14): peak memory and speed of one long prompt, each run in a fresh process.

For each prompt length L (``--lengths``, default 8192 16384 32768 65536) on the built-in ``tiny``
model (CPU), side by side in one run:

- ``bare_sdpa``: transformers' own forward of the same model with ``attn_implementation="sdpa"``
  and no hooks (what memory linear in L looks like for this model);
- ``bare_eager``: the same forward with the eager attention gdn-dump's bridge runs today;
- ``extract``: ``gdn-dump extract --hooks beta`` of the one prompt (every GDN layer; the
  forward stops before tiny's attention layer, which comes last);
- ``extract_attn``: the same plus ``blocks.3.hook_resid_post``, so the attention layer runs
  through TransformerLens's attention bridge;
- ``extract_default``: the default hooks (about 2 KB of rows a token), the rows held until the
  prompt is done (they are below the default 1 GiB ``--sort-window``);
- ``extract_stream``: the same with ``--sort-window 16MiB``: a prompt of 8k tokens or more fills
  a window by itself and streams, its rows written in pieces as the hooks fire;
- ``attn_matrix``: ``gdn-dump attn-matrix --layer 0`` (the exact matrix of one GDN layer), up to
  ``--matrix-max`` tokens (the matrix is ``heads x L^2 x 4`` bytes on disk, half of it written);
- ``attn_matrix_head``: the same for head 0 alone, at every length (8 GiB written at 64k).

Each run is a child process with an address-space limit (``--limit-gib``): one that needs more
reports ``over the limit`` instead of taking the machine down. Reported per run: peak RSS above
the process's RSS after the model loaded (VmHWM - baseline), tokens/s, for gdn-dump's runs the
``--dry-run`` estimate of the same (:mod:`gdn_dump.run.memory`, weights left out as in the
measurement), and for each contender the growth of that peak from the shortest to each length
(linear in L would be L / L_min). ``scripts/bench.py --long`` runs this table too.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONTENDERS = ("bare_sdpa", "bare_eager", "extract", "extract_attn", "extract_default",
              "extract_stream", "attn_matrix", "attn_matrix_head")
OPTIONS = {"extract": dict(hooks="beta"), "extract_attn": dict(hooks="beta,blocks.3.hook_resid_post"),
           "extract_default": dict(), "extract_stream": dict(sort_window_bytes=16 << 20),
           "attn_matrix": dict(command="attn-matrix", attn_layers="0", max_attn_bytes=1 << 40, hooks=""),
           "attn_matrix_head": dict(command="attn-matrix", attn_layers="0", attn_heads="0",
                                    max_attn_bytes=1 << 40, hooks="")}


def _rss_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith(field + ":"))


def child(contender: str, length: int, tmp: Path) -> dict:
    """One run of ``contender`` on one prompt of ``length`` tokens, in this (fresh) process."""
    import torch

    from gdn_dump.model.load import load_model
    from gdn_dump.model.tiny import build_tiny_model

    ids = torch.randint(10, 200, (1, length))
    if contender.startswith("bare"):
        model, _ = build_tiny_model()
        model.config._attn_implementation = contender.removeprefix("bare_")
        base = _rss_kib("VmRSS")
        t = time.perf_counter()
        with torch.inference_mode():
            model.model(input_ids=ids, use_cache=False)
        seconds = time.perf_counter() - t
    else:
        from gdn_dump.run.options import ExtractOptions
        from gdn_dump.run.pipeline import extract, plan_memory

        model = load_model("tiny", device="cpu")
        prompts = tmp / f"long-{length}.jsonl"
        text = model.tokenizer.decode(ids[0].tolist())
        prompts.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
        opts = ExtractOptions(model="tiny", prompts=str(prompts), out=str(tmp / "s.zarr"),
                              overwrite=True, force=True, max_length=length, **OPTIONS[contender])
        base = _rss_kib("VmRSS")
        t = time.perf_counter()
        result = extract(opts, model=model)
        seconds = time.perf_counter() - t
        peak = (_rss_kib("VmHWM") - base) / 1024
        (guess,) = plan_memory(opts, model.config, result.plan, result.split, [int(result.tokens)])
        return {"peak_mib": peak, "seconds": seconds, "tokens": int(result.tokens),
                "estimate_mib": (guess.host_bytes - guess.weights) / 2**20,
                "written_mib": result.bytes_written / 2**20}
    return {"peak_mib": (_rss_kib("VmHWM") - base) / 1024, "seconds": seconds, "tokens": length}


def run(contender: str, length: int, tmp: Path, limit_gib: float) -> dict | None:
    code = ("import resource, sys, json; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({int(limit_gib * 2**30)}, {int(limit_gib * 2**30)})); "
            "sys.path.insert(0, 'scripts'); import bench_long; "
            f"print('RESULT', json.dumps(bench_long.child({contender!r}, {length}, "
            f"bench_long.Path({str(tmp)!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode or line is None:
        memory = any(m in out.stderr.lower() for m in ("memoryerror", "out of memory", "allocate memory"))
        print(f"  {contender} L={length}: {'over the limit' if memory else 'failed'} "
              f"(exit {out.returncode}) {out.stderr.strip().splitlines()[-1:] if not memory else ''}")
        return None
    return json.loads(line.removeprefix("RESULT "))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--matrix-max", type=int, default=16384, help="longest attn-matrix prompt")
    parser.add_argument("--eager-max", type=int, default=32768, help="longest bare_eager prompt "
                        "(its [L, L] mask alone is 16 GiB at 64k)")
    parser.add_argument("--limit-gib", type=float, default=16.0, help="address space per child")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    args = parser.parse_args(argv)
    print(f"date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}; model tiny (CPU); one prompt per run, "
          f"a fresh process each, address space limited to {args.limit_gib:g} GiB")
    results: dict[str, dict[int, dict | None]] = {c: {} for c in args.contenders}
    with tempfile.TemporaryDirectory(prefix="bench_long_") as tmp:
        for length in args.lengths:
            for contender in args.contenders:
                if ((contender == "attn_matrix" and length > args.matrix_max)
                        or (contender == "bare_eager" and length > args.eager_max)):
                    continue
                results[contender][length] = r = run(contender, length, Path(tmp), args.limit_gib)
                if r:
                    print(f"  {contender} L={length}: peak {r['peak_mib']:.0f} MiB above baseline, "
                          f"{r['tokens'] / r['seconds']:.0f} tokens/s", flush=True)
    print()
    print(f"{'contender':<16} {'L':>7} {'peak MiB':>9} {'estimate':>9} {'written MiB':>12} "
          f"{'tokens/s':>9} {'peak growth':>12} {'linear':>7}")
    for contender, by_length in results.items():
        first = next(((n, r) for n, r in by_length.items() if r), None)
        for n, r in by_length.items():
            if r is None:
                print(f"{contender:<16} {n:>7} {'over the limit':>9}")
                continue
            growth = r["peak_mib"] / max(first[1]["peak_mib"], 1e-9)
            guess = f"{r['estimate_mib']:.0f}" if "estimate_mib" in r else "-"
            written = f"{r['written_mib']:.0f}" if "written_mib" in r else "-"
            print(f"{contender:<16} {n:>7} {r['peak_mib']:>9.0f} {guess:>9} {written:>12} "
                  f"{r['tokens'] / r['seconds']:>9.0f} {growth:>11.1f}x {n / first[0]:>6.1f}x")


if __name__ == "__main__":
    main()
