"""Which earlier tokens, through which GDN heads, most raised the logit of the token the model
predicts next? Reads a ``gdn-dump contributions`` store (``--logits next``, the default).

    python examples/top_contributions.py contrib.zarr [PROMPT] [POSITION]

POSITION (default: the prompt's second to last token) is the query i; its target is token i + 1.
"""

from __future__ import annotations

import sys

import numpy as np

from gdn_dump import open_store
from gdn_dump.catalogue import CONTRIBUTION_LOGIT, contribution_name

store = open_store(sys.argv[1])
record = store.prompt(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
i = int(sys.argv[3]) if len(sys.argv) > 3 else len(record) - 2
tokens = [store.tokenizer.decode([t]) if store.tokenizer else str(t) for t in record.token_ids]
layers = store.provenance["contributions"]["layers"]

rows = []  # (logit, layer, head, source, share of the layer's written norm at i)
for layer in layers:
    logit = record.contribution(layer, CONTRIBUTION_LOGIT, query=i)[:, :i + 1]  # [heads, i + 1]
    norm = record.contribution(layer, query=i)[:, :i + 1]  # ||c||: how much each source writes
    heads = store[contribution_name(layer, CONTRIBUTION_LOGIT)].attrs["heads"]
    for h, j in zip(*np.unravel_index(np.argsort(logit, axis=None)[::-1][:3], logit.shape)):
        rows.append((float(logit[h, j]), layer, heads[h], int(j), float(norm[h, j] / norm.sum())))

print(f"prompt {record.id!r}, position {i} ({tokens[i]!r}) predicting {tokens[i + 1]!r}")
print(f"{'logit':>8}  {'layer':>5}  {'head':>4}  {'source token':<24}{'norm share':>10}")
for logit, layer, head, j, share in sorted(rows, reverse=True)[:8]:
    print(f"{logit:+8.4f}  {layer:>5}  {head:>4}  {f'{j} {tokens[j]!r}':<24}{share:>10.1%}")
total = sum(record.contribution(layer, CONTRIBUTION_LOGIT, query=i).sum() for layer in layers)
print(f"all heads and sources of layers {layers}: {total:+.4f}")
