"""Per-prompt matrices of a store: the arrays ``[n_prompts, heads, L_max, L_max(, d_model)]``.

Two commands write them, one array per layer (the names come from :mod:`gdn_dump.catalogue`):

* ``attn-matrix`` / ``extract --attn-layers``: the attention matrix ``blocks.<i>.attn_matrix``
  ``[n_prompts, heads, L_max, L_max]`` (query, key);
* ``contributions``: ``blocks.<i>.contribution_norm`` (``||c_{h,i,j}||``, how much source token
  j writes through head h into the residual stream at position i) and
  ``blocks.<i>.contribution_logit`` (its direct logit attribution to the target at i, the next
  token by default) ``[n_prompts, heads, L_max, L_max]``, and with ``--vectors``
  ``blocks.<i>.contribution`` (``c_{h,i,j}`` itself) ``[n_prompts, heads, L_max, L_max, d_model]``.
  The per-prompt ``blocks.<i>.contribution_residual`` ``[n_prompts]`` is an ordinary array.

Axis 1 holds the heads listed in the array's ``heads`` attribute (model head indices: all of the
layer's, or those ``--heads`` chose). Each prompt's block is zero above the diagonal and past the
prompt's length n; reading it cuts it to ``[heads, n, n(, d_model)]``, and a head or a query
position alone reads only the chunks holding it (the vectors of a long prompt are large).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..catalogue import contribution_name, layer_of

if TYPE_CHECKING:
    from .reader import Store

PROMPT_DIM = "prompt"

__all__ = ["matrix_arrays", "stored_heads", "read_matrix", "contribution_layers", "with_head_coordinates"]


def matrix_arrays(dims: dict[str, tuple[str, ...]]) -> list[str]:
    """The per-prompt matrix arrays among ``{name: dimension names}``: 4-d or 5-d on ``prompt``."""
    return sorted(name for name, d in dims.items() if len(d) >= 4 and d[0] == PROMPT_DIM)


def stored_heads(arr) -> list[int]:
    """The model's head index of each entry of axis 1 of a matrix array (its ``heads`` attribute)."""
    return [int(h) for h in arr.attrs.get("heads", range(arr.shape[1]))]


def contribution_layers(names, suffix: str) -> list[int]:
    """The layers that have contribution array ``suffix`` (a ``catalogue.CONTRIBUTION_*``) among
    array ``names``, sorted."""
    names = set(names)
    layers = {layer_of(name) for name in names}
    return sorted(layer for layer in layers - {None} if contribution_name(layer, suffix) in names)


def read_matrix(store: Store, name: str, prompt: int, n: int, head: int | None = None,
                query: int | None = None) -> np.ndarray:
    """Prompt ``prompt`` (``n`` tokens) of matrix array ``name``: ``[heads, n, n]`` (query, key)
    or ``[heads, n, n, d_model]`` for contribution vectors. ``head`` (a model head index, one of
    the array's ``heads``) drops the heads axis; ``query`` (``0 <= query < n``) drops the query
    axis, leaving that position's row of keys. KeyError for an array that is not a matrix,
    ValueError for a head not stored, IndexError for a query out of range."""
    if name not in store.matrices:
        raise KeyError(f"{name!r} is not a per-prompt matrix of {store.path}; it has "
                       f"{', '.join(store.matrices) or 'none'}")
    arr = store[name]
    h: int | slice = slice(None)
    if head is not None:
        heads = stored_heads(arr)
        if int(head) not in heads:
            raise ValueError(f"head {head} is not stored in {name}; it has heads "
                             f"{', '.join(map(str, heads))}")
        h = heads.index(int(head))
    q: int | slice = slice(0, n)
    if query is not None:
        if not 0 <= int(query) < n:
            raise IndexError(f"query {query} is out of range: prompt {prompt} has {n} tokens")
        q = int(query)
    return np.asarray(arr[prompt, h, q, :n])


def with_head_coordinates(store: Store, ds):
    """``ds`` (the store's xarray view) with the model's head indices as the coordinate of each
    head axis of the matrix arrays (``v_head``, ``attn_head``, ``selected_v_head``, ...), so
    ``ds.sel(selected_v_head=2)`` is model head 2. An axis whose arrays store different heads
    (``--heads`` chose others in another layer) keeps no coordinate: see each array's ``heads``."""
    found: dict[str, list[int] | None] = {}
    for name in store.matrices:
        arr = store[name]
        dim = tuple(arr.metadata.dimension_names or ())[1]
        heads = stored_heads(arr)
        found[dim] = heads if found.get(dim, heads) == heads else None
    coords = {dim: heads for dim, heads in found.items()
              if heads is not None and dim not in ds.coords and ds.sizes.get(dim) == len(heads)}
    return ds.assign_coords(coords) if coords else ds
