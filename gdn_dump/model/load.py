"""Loading models through TransformerLens's ``TransformerBridge``.

Published Qwen3.5 checkpoints are saved as ``Qwen3_5ForConditionalGeneration`` (text + vision). The
text model is loaded directly from them (``from_pretrained(path, config=config.text_config)``) and
handed to ``boot_transformers(hf_model=...)``, which gives the text adapter and its hook names
without pulling in the vision stack (torchvision). Kernels: :mod:`gdn_dump.model.kernels`; the
built-in model: :mod:`gdn_dump.model.tiny`; what ``--model`` names: :mod:`gdn_dump.model.source`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..catalogue import GDN_LAYER_TYPE, Catalogue
from ..dtypes import MODEL_DTYPES, check
from ..errors import GdnDumpError
from ..tokenizer import TINY_NAME, build_tiny_tokenizer
from .kernels import HF_ATTENTION, select_kernels
from .source import load_error, loading_errors, no_safetensors, resolve_source
from .tiny import build_tiny_model, tiny_text_config

SUPPORTED_MODEL_TYPES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")


def catalogue(config) -> Catalogue:
    """The hook catalogue of a model config, with TransformerLens's GDN hook aliases."""
    from transformer_lens.model_bridge.generalized_components.gated_delta_net import (
        GatedDeltaNetBridge,
    )

    return Catalogue(config, aliases=GatedDeltaNetBridge.hook_aliases)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name of :mod:`gdn_dump.dtypes` (they are torch's names too)."""
    return getattr(torch, name)


@dataclass
class LoadedModel:
    """A booted bridge with what the rest of the tool needs to know about it."""

    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    hf_model: Any
    tokenizer: Any
    config: Any  # the text config
    name: str
    revision: str | None
    device: torch.device
    dtype: torch.dtype
    kernel_backend: str
    info: dict = field(default_factory=dict)

    @property
    def layer_types(self) -> list[str]:
        return list(self.config.layer_types)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GdnDumpError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise GdnDumpError(f"--device must be auto, cpu or cuda[:N], not {device!r}")
    return torch.device(device)


def resolve_model_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(check("--model-dtype", name, ("auto", *MODEL_DTYPES)))


def load_model(
    name: str,
    *,
    revision: str | None = None,
    device: str = "auto",
    model_dtype: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
    kernels: str = "auto",
) -> LoadedModel:
    """Load ``name`` (``tiny``, a hub id or a local directory) and boot the bridge on it."""
    torch_device = resolve_device(device)
    dtype = resolve_model_dtype(model_dtype, torch_device)
    if name == TINY_NAME:
        hf_model, tokenizer = build_tiny_model()
    else:
        hf_model, tokenizer = _load_pretrained(
            name, revision, dtype, trust_remote_code, allow_pickle_weights
        )
    return wrap_model(hf_model, tokenizer, name=name, revision=revision, device=torch_device,
                      dtype=dtype, kernels=kernels)


def wrap_model(hf_model, tokenizer, *, name: str, device: torch.device, dtype: torch.dtype,
               revision: str | None = None, kernels: str = "auto") -> LoadedModel:
    """Boot the bridge on an HF Qwen3.5 text model already in memory (benchmarks use this too)."""
    from transformer_lens.model_bridge import TransformerBridge

    backend = select_kernels(device, kernels)
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    config = hf_model.config
    config._attn_implementation = HF_ATTENTION  # models built elsewhere (benchmarks) too
    _check_architecture(name, config)
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    bridge.eval()
    return LoadedModel(
        bridge=bridge,
        hf_model=hf_model,
        tokenizer=tokenizer,
        config=config,
        name=name,
        revision=revision,
        device=device,
        dtype=dtype,
        kernel_backend=backend,
        info=model_provenance(name, revision, config, device, dtype, backend),
    )


def load_config(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The text config of ``name`` (no weights): enough for the catalogue and the plan."""
    if name == TINY_NAME:
        return tiny_text_config()
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, name, "config", revision, trust_remote_code=trust_remote_code)
    text_config = getattr(config, "text_config", None) or config
    _check_architecture(name, text_config)
    return text_config


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    if name == TINY_NAME:
        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name, "tokenizer", revision,
                                 trust_remote_code=trust_remote_code)
    # Without tokenizer files transformers quietly builds an empty tokenizer (every prompt -> no tokens).
    if len(tokenizer) < 2:
        raise GdnDumpError(f"--model {name}: it has no tokenizer (no tokenizer.json or vocabulary files)")
    return tokenizer


def _load_pretrained(name, revision, dtype, trust_remote_code, allow_pickle_weights):
    from transformers import AutoModelForCausalLM

    text_config = load_config(name, revision=revision, trust_remote_code=trust_remote_code)
    text_config._attn_implementation = HF_ATTENTION
    model = _from_pretrained(
        AutoModelForCausalLM, name, "weights", revision, config=text_config, dtype=dtype,
        trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle_weights else True,
    )
    tokenizer = load_tokenizer(name, revision=revision, trust_remote_code=trust_remote_code)
    return model, tokenizer


def _from_pretrained(auto_class, name: str, what: str, revision: str | None, **kwargs):
    """``auto_class.from_pretrained`` on what ``--model name`` designates; any failure -> one line."""
    source = resolve_source(name)
    try:
        return auto_class.from_pretrained(source, revision=revision, **kwargs)
    except loading_errors() as exc:
        if what == "weights" and kwargs.get("use_safetensors") and "model.safetensors" in str(exc):
            raise no_safetensors(name, source) from exc
        raise load_error(name, what, exc, revision) from exc


def _check_architecture(name: str, config) -> None:
    model_type = getattr(config, "model_type", None)
    layer_types = list(getattr(config, "layer_types", None) or [])
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise GdnDumpError(
            f"--model {name}: model type {model_type!r} is not a Qwen3.5 / Qwen3-Next hybrid "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if GDN_LAYER_TYPE not in layer_types:
        found = ", ".join(f"{layer_types.count(t)} {t}" for t in dict.fromkeys(layer_types)) or "none"
        raise GdnDumpError(f"--model {name}: the model has no Gated DeltaNet (linear_attention) layers "
                           f"(its layer types: {found})")


def model_provenance(name, revision, config, device, dtype, backend) -> dict:
    config_dict = config.to_dict()
    config_dict.pop("transformers_version", None)
    return {
        "name": name,
        "revision": revision,
        "config": config_dict,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "kernel_backend": backend,
        "hf_attn_implementation": HF_ATTENTION,
    }
