"""Loading models through TransformerLens's ``TransformerBridge``, and the built-in ``tiny`` model.

Published Qwen3.5 checkpoints are saved as ``Qwen3_5ForConditionalGeneration`` (text + vision). The
text model is loaded directly from them (``from_pretrained(path, config=config.text_config)``) and
handed to ``boot_transformers(hf_model=...)``, which gives the text adapter and its hook names
without pulling in the vision stack (torchvision).

The GDN kernels are chosen by device, not by what happens to be importable: transformers binds
flash-linear-attention's Triton kernels at import time whenever ``fla`` is installed, and those crash
on CPU tensors. :func:`select_kernels` rebinds the modeling modules' functions explicitly.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..catalogue import ATTENTION_LAYER_TYPE, GDN_LAYER_TYPE  # noqa: F401 - re-exported
from ..errors import GdnDumpError
from .source import load_error, loading_errors, no_safetensors, resolve_source

TINY_NAME = "tiny"
SUPPORTED_MODEL_TYPES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")
# Modules whose GDN forward resolves kernels through module-level names (transformers >= 5.15).
_MODELING_MODULES = (
    "transformers.models.qwen3_5.modeling_qwen3_5",
    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
    "transformers.models.qwen3_next.modeling_qwen3_next",
)
_REFERENCES: dict[tuple[str, str], object] = {}  # (modeling module, function) -> torch reference
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# The tiny model: every code path of a real Qwen3.5 (GQA with n_v = 2 n_k, conv kernel 4,
# gated-q softmax attention), small enough for a test to run it in milliseconds.
TINY_TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    layer_types=[GDN_LAYER_TYPE] * 3 + [ATTENTION_LAYER_TYPE],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)
TINY_SEED = 0


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


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: covers any UTF-8 text, needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def tiny_text_config(tokenizer=None):
    from transformers import Qwen3_5TextConfig

    tokenizer = tokenizer or build_tiny_tokenizer()
    return Qwen3_5TextConfig(
        vocab_size=len(tokenizer) + 3,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TINY_TEXT_CONFIG,
    )


def build_tiny_model():
    """The deterministic random-initialised tiny Qwen3.5 text model and its tokenizer."""
    from transformers import Qwen3_5ForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = tiny_text_config(tokenizer)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = Qwen3_5ForCausalLM(config)
    return model.eval(), tokenizer


def save_tiny_checkpoint(path: str | Path, multimodal: bool = True) -> Path:
    """Save ``tiny`` as a checkpoint directory, by default in the published multimodal layout.

    The multimodal form (``Qwen3_5ForConditionalGeneration`` with a vision tower of depth 1) is what
    real Qwen3.5 checkpoints look like, so loading it exercises the text-model extraction path.
    """
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    path = Path(path)
    text_model, tokenizer = build_tiny_model()
    if multimodal:
        text_config = text_model.config.to_dict()
        vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                      out_hidden_size=text_model.config.hidden_size)
        config = Qwen3_5Config(text_config=text_config, vision_config=vision)
        model = Qwen3_5ForConditionalGeneration(config)
        model.model.language_model.load_state_dict(text_model.model.state_dict())
        model.lm_head.load_state_dict(text_model.lm_head.state_dict())
    else:
        model = text_model
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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
    if name not in _DTYPES:
        raise GdnDumpError(f"--model-dtype must be one of auto, {', '.join(_DTYPES)}; not {name!r}")
    return _DTYPES[name]


def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


KERNEL_CHOICES = ("auto", "torch", "fla")


def select_kernels(device: torch.device, kernels: str = "auto") -> str:
    """Bind the GDN chunk kernel and causal conv for ``device``; return the backend's name.

    ``auto``: ``fla`` on CUDA when flash-linear-attention is installed (plus causal-conv1d's kernel
    when that is installed too), transformers' torch reference everywhere else. ``torch`` forces
    the reference (e.g. to compare); ``fla`` requires it.
    """
    if kernels not in KERNEL_CHOICES:
        raise GdnDumpError(f"--kernels must be one of {', '.join(KERNEL_CHOICES)}, not {kernels!r}")
    if kernels == "fla" and (device.type != "cuda" or not fla_available()):
        raise GdnDumpError("--kernels fla needs a CUDA device and flash-linear-attention "
                           "(pip install 'gdn-dump[gpu]')")
    use_fla = kernels != "torch" and device.type == "cuda" and fla_available()
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
    text_config._attn_implementation = "eager"
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
    }
