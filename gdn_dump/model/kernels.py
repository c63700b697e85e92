"""GDN kernels chosen by device, not by what happens to be importable.

transformers binds flash-linear-attention's Triton kernels at import time whenever ``fla`` is
installed, and those crash on CPU tensors. :func:`select_kernels` rebinds the modeling modules'
functions explicitly: fla (and causal-conv1d) on CUDA, transformers' torch reference elsewhere.
No torch at import: the command line reads :data:`KERNEL_CHOICES` from here.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from ..errors import GdnDumpError

KERNEL_CHOICES = ("auto", "torch", "fla")
# What transformers is told its attention is. TransformerLens's attention bridge computes softmax
# attention itself (its hooks need the scores), so this decides only the causal mask transformers
# builds for the layers: "eager" materialises a [batch, 1, L, L] float mask (4.3 GB at 32k
# tokens, even when no attention layer runs); "sdpa" skips it for a causal batch without padding
# mask. Every hook of tiny was measured bit-identical either way (tests/model/test_models.py).
HF_ATTENTION = "sdpa"
# Modules whose GDN forward resolves kernels through module-level names (transformers >= 5.15).
_MODELING_MODULES = (
    "transformers.models.qwen3_5.modeling_qwen3_5",
    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
    "transformers.models.qwen3_next.modeling_qwen3_next",
)
_REFERENCES: dict[tuple[str, str], object] = {}  # (modeling module, function) -> torch reference


def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


def uses_fla(device, kernels: str = "auto") -> bool:
    """Whether ``--kernels`` on ``device`` runs fla's chunk kernel (see :func:`select_kernels`)."""
    if kernels not in KERNEL_CHOICES:
        raise GdnDumpError(f"--kernels must be one of {', '.join(KERNEL_CHOICES)}, not {kernels!r}")
    if kernels == "fla" and (device.type != "cuda" or not fla_available()):
        raise GdnDumpError("--kernels fla needs a CUDA device and flash-linear-attention "
                           "(pip install 'gdn-dump[gpu]')")
    return kernels != "torch" and device.type == "cuda" and fla_available()


def select_kernels(device, kernels: str = "auto") -> str:
    """Bind the GDN chunk kernel and causal conv for ``device``; return the backend's name.

    ``auto``: ``fla`` on CUDA when flash-linear-attention is installed (plus causal-conv1d's kernel
    when that is installed too), transformers' torch reference everywhere else. ``torch`` forces
    the reference (e.g. to compare); ``fla`` requires it.
    """
    use_fla = uses_fla(device, kernels)
    chunk = conv = None
    if use_fla:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as chunk

        if importlib.util.find_spec("causal_conv1d") is not None:
            from causal_conv1d import causal_conv1d_fn as conv
    for module_name in _MODELING_MODULES:
        module = sys.modules.get(module_name) or _try_import(module_name)
        if module is None:
            continue
        for attr, fast in (("torch_chunk_gated_delta_rule", chunk), ("causal_conv1d_fn", conv)):
            current = getattr(module, attr, None)
            if current is None:
                continue
            # The reference is taken once, from transformers' own function (its ``__wrapped__``
            # skips the hub dispatch): once a fast kernel is bound, that kernel's ``__wrapped__``
            # is its own undecorated body, not the reference.
            reference = _REFERENCES.setdefault((module_name, attr), getattr(current, "__wrapped__", current))
            setattr(module, attr, fast if fast is not None else reference)
    if not use_fla:
        return "torch"
    return "fla+causal_conv1d" if conv is not None else "fla"


def _try_import(module_name: str):
    try:
        return importlib.import_module(module_name)
    except Exception:  # an architecture missing from this transformers version
        return None
