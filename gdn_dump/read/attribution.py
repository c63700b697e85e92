"""The data behind ``gdn-dump plot --kind contrib`` and ``--kind logit``: the per-source-token
contributions that ``gdn-dump contributions`` stores (see :mod:`gdn_dump.read.matrices`), of one
finished prompt, as numpy arrays (testable without drawing; :mod:`gdn_dump.read.plots` draws them).

* ``contrib``: one head's ``||c_{h,i,j}||`` ``[n, n]``, how much source token j writes through
  head h into the residual stream at position i (:func:`contribution_data`);
* ``logit``: which source tokens pushed the prediction at one position i: the direct logit
  attribution of ``c_{h,i,j}`` to the target logit at i (the token at i + 1, or the fixed token
  of ``--logits ID``), summed over the stored heads, per layer (or per head of one layer), for
  the keys ``j <= i`` (:func:`logit_data`). Only one query row of each layer is read.
"""

from __future__ import annotations

import numpy as np

from ..catalogue import CONTRIBUTION_LOGIT, CONTRIBUTION_NORM, LOGITS_NEXT, contribution_name
from ..errors import GdnDumpError
from .figures import _check_prompt, _ranges, as_store, head_matrix
from .reader import Store
from .matrices import contribution_layers, read_matrix, stored_heads

NO_CONTRIBUTIONS = ("the store has no contributions (blocks.<i>.contribution_norm); make them with "
                    "gdn-dump contributions")
NO_LOGITS = ("the store's contributions have no logit attribution (blocks.<i>.contribution_logit; "
             "made with --logits none): rerun gdn-dump contributions with --logits next or a token id")


def contribution_arrays(store, suffix: str = CONTRIBUTION_NORM) -> dict[int, str]:
    """``{layer: array name}`` of contribution array ``suffix`` (a ``catalogue.CONTRIBUTION_*``)."""
    return {layer: contribution_name(layer, suffix)
            for layer in contribution_layers(as_store(store), suffix)}


def contribution_data(store, layer: int | None = None, head: int | None = None, prompt: int = 0) -> dict:
    """One (finished) prompt's ``||c_{h,i,j}||`` of one head, ``[n, n]`` (position i, source j),
    its tokens: ``layer`` (default: the first with contributions), ``head`` (a model head
    index; default: the first stored). Keys as :func:`gdn_dump.read.figures.head_matrix`."""
    store = as_store(store)
    return head_matrix(store, contribution_arrays(store), CONTRIBUTION_NORM, NO_CONTRIBUTIONS,
                       layer, head, prompt)


def logit_data(store, layer: int | None = None, head: int | None = None, prompt: int = 0,
               query: int | None = None) -> dict:
    """Which source tokens pushed the target logit at position ``query`` of one (finished) prompt.

    Rows: every layer with ``contribution_logit``, each the sum over its stored heads (only
    ``head`` if given); with ``layer``, that layer's heads one per row (or ``head`` alone).
    ``query`` defaults to the prompt's last position that has a target (n - 2 for the next
    token, n - 1 for a fixed token id). Returns ``{"values": [rows, query + 1]`` float64 (the
    keys j = 0..query), ``"total": [query + 1]`` (the rows summed), ``"labels"`` (one a row),
    ``"axis"`` ("layer" or "head"), ``"layers"``, ``"heads"`` ({layer: heads summed}), ``"head"``,
    ``"query"``, ``"target"`` ("next" or the token id), ``"target_token"`` (the id at query),
    ``"tokens": [n]``, ``"prompt"``, ``"prompt_id"``}."""
    store = as_store(store)
    arrays = contribution_arrays(store, CONTRIBUTION_LOGIT)
    if not arrays:
        raise GdnDumpError(NO_LOGITS if contribution_arrays(store) else NO_CONTRIBUTIONS)
    if layer is not None and layer not in arrays:
        raise GdnDumpError(f"--layer {layer} has no {CONTRIBUTION_LOGIT} in this store; layers "
                           f"with one: {', '.join(map(str, arrays))}")
    chosen = {layer: arrays[layer]} if layer is not None else arrays
    heads = {each: _heads(store, name, head) for each, name in chosen.items()}
    tokens, query, target = _query(store, prompt, query, store[next(iter(chosen.values()))])
    n = len(tokens)
    rows, labels = [], []
    for each, name in chosen.items():
        block = read_matrix(store, name, prompt, n, query=query)[:, :query + 1].astype(np.float64)
        picked = block[[stored_heads(store[name]).index(h) for h in heads[each]]]  # [heads, keys]
        if layer is not None:
            rows.extend(picked)
            labels.extend(f"head {h}" for h in heads[each])
        else:
            rows.append(picked.sum(axis=0))
            labels.append(_layer_label(store[name], each, head))
    values = np.stack(rows)
    return {"values": values, "total": values.sum(axis=0), "labels": labels,
            "axis": "layer" if layer is None else "head", "layers": list(chosen), "heads": heads,
            "head": head,
            "query": query, "target": target,
            "target_token": int(tokens[query + 1]) if target == LOGITS_NEXT else int(target),
            "tokens": tokens, "prompt": prompt, "prompt_id": store.prompt_ids[prompt]}


def _heads(store: Store, name: str, head: int | None) -> list[int]:
    heads = stored_heads(store[name])
    if head is None:
        return heads
    if head not in heads:
        raise GdnDumpError(f"--head {head} is out of range: {name} has heads {_ranges(heads)}")
    return [head]


def _query(store: Store, prompt: int, query: int | None, arr) -> tuple[np.ndarray, int, str | int]:
    """The prompt's tokens, the query position (checked, or the default) and the logit target."""
    _check_prompt(store, prompt)
    rows = store.rows(prompt)
    tokens = np.asarray(store["tokens"][rows])
    n = len(tokens)
    if n == 0:
        raise GdnDumpError(f"--prompt {prompt} has no stored tokens (skipped as too long)")
    target = arr.attrs.get("target", LOGITS_NEXT)
    last = n - 2 if target == LOGITS_NEXT else n - 1
    if last < 0:
        raise GdnDumpError(f"--prompt {prompt} has 1 token: no position has a next token to predict")
    if query is None:
        return tokens, last, target
    if not 0 <= query <= last:
        what = "a next token" if target == LOGITS_NEXT else f"token {target}'s logit"
        raise GdnDumpError(f"--query {query} is out of range: prompt {prompt} has {n} tokens; the "
                           f"positions with {what}: 0-{last}")
    return tokens, int(query), target


def _layer_label(arr, layer: int, head: int | None) -> str:
    kind = arr.attrs.get("layer_type")
    return f"layer {layer}" + (f" ({kind})" if kind and kind != "gdn" else "") + \
        (f", head {head}" if head is not None else "")
