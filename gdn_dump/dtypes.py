"""The one table of dtype names: which names each option takes, and how many bytes a value is.

A leaf: no torch, no zarr. Every name here is also the name of numpy's (ml_dtypes' for bfloat16)
and torch's dtype, so the torch dtype of a name is ``getattr(torch, name)``
(:func:`gdn_dump.model.load.torch_dtype`) and the zarr data type is made in
:func:`gdn_dump.store.bfloat16.zarr_dtype`.
"""

from __future__ import annotations

from .errors import GdnDumpError

ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}

STORAGE_DTYPES = ("float32", "float16", "bfloat16")  # --dtype: how vector hooks are stored
SCALAR_DTYPE = "float32"  # per-head scalars (beta, log decay) whatever --dtype says
# --state-dtype: states have a wider range than activations (a sum over the whole prompt)
STATE_DTYPES = STORAGE_DTYPES
STATE_DTYPE = "float32"
MODEL_DTYPES = ("float32", "float16", "bfloat16")  # --model-dtype (besides "auto")
PRECISIONS = ("float32", "float64")  # --precision: what the exact attention is computed in
MATRIX_DTYPE = "float32"  # attention matrices, whatever they were computed in
RESIDUAL_DTYPE = "float64"  # per-prompt attention residuals
# machine epsilon of each model dtype: a 16-bit model's hooks are rounded to it, so a check of the
# exact decompositions against them cannot be tighter than a few of these (store.finalize)
EPSILON = {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}
TOKEN_DTYPE = "int32"
INDEX_DTYPE = "int64"  # prompt_start, prompt_length, state_start, state_count, state_position


def itemsize(name: str) -> int:
    return ITEMSIZE[name]


def check(option: str, name: str, choices: tuple[str, ...]) -> str:
    """``name`` if it is one of ``choices``, else the one-line error naming ``option``."""
    if name not in choices:
        raise GdnDumpError(f"{option} must be one of {', '.join(choices)}, not {name!r}")
    return name


def hook_dtype(scalar: bool, storage_dtype: str) -> str:
    """What a hook is stored as: per-head scalars in float32, vectors in ``--dtype``."""
    return SCALAR_DTYPE if scalar else storage_dtype
