"""The ``--dry-run`` memory estimate (``gdn_dump.run.memory``) of one long prompt on a
0.8B-shaped Qwen3.5 (the published shapes of ``scripts/gpu_check.py``), on a GPU in bfloat16 with
fla's kernels and on the CPU in float32: what the README's "Long prompts" limits are made of.

No weights, no GPU: the config and the plan alone. Run::

    python scripts/long_estimates.py [--hooks default] [--lengths 32768 65536 131072 262144]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gdn_dump.catalogue import Catalogue  # noqa: E402
from gdn_dump.model.attention import SDPA  # noqa: E402
from gdn_dump.run.memory import estimate_memory  # noqa: E402
from gdn_dump.run.options import SORT_WINDOW_BYTES  # noqa: E402
from gdn_dump.store.layout import format_bytes, make_plan  # noqa: E402


def main(argv=None) -> None:
    from transformers import Qwen3_5TextConfig

    from gpu_check import QWEN35_08B

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hooks", default=None, help="--hooks (default: the default set)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072, 262144])
    args = parser.parse_args(argv)
    config = Qwen3_5TextConfig(**QWEN35_08B)
    hooks = Catalogue(config).select(args.hooks, None)
    print(f"0.8B-shaped Qwen3.5, hooks {args.hooks or 'default'} of every GDN layer, one prompt")
    print(f"{'device':<22} {'tokens':>8} {'rows stored':>12} {'weights':>10} {'forward':>10} "
          f"{'host rows':>10} {'device total':>13} {'host total':>11}")
    for device, dtype, fla in (("cuda", "bfloat16", True), ("cpu", "float32", False)):
        for n in args.lengths:
            plan = make_plan(hooks, np.array([n]))
            stream_from = max(1, SORT_WINDOW_BYTES // plan.bytes_per_token)
            e = estimate_memory(config, plan, n, model_dtype=dtype, device=device, fla=fla,
                                softmax=SDPA, stream_from=stream_from)
            label = f"{device} {dtype}{' fla' if fla else ''}"
            print(f"{label:<22} {n:>8,} {format_bytes(plan.total_bytes):>12} "
                  f"{format_bytes(e.weights):>10} {format_bytes(e.forward):>10} "
                  f"{format_bytes(e.rows) + (' s' if e.streams else ''):>10} "
                  f"{format_bytes(e.device_bytes):>13} {format_bytes(e.host_bytes):>11}")
    print("s: streamed (the prompt's rows fill the default 1 GiB --sort-window by themselves)")


if __name__ == "__main__":
    main()
