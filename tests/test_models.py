"""Model loading: the tiny model, kernel choice by device, architecture checks."""

from __future__ import annotations

import functools

import pytest
import torch

from gdn_dump.errors import GdnDumpError
from gdn_dump.models import build_tiny_model, load_config, resolve_model_dtype, select_kernels


def test_tiny_is_deterministic_and_has_every_code_path():
    a, tokenizer = build_tiny_model()
    b, _ = build_tiny_model()
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    config = a.config
    assert config.layer_types.count("linear_attention") >= 3
    assert config.layer_types.count("full_attention") >= 1
    assert config.linear_num_value_heads > config.linear_num_key_heads  # GQA path
    assert config.linear_conv_kernel_dim == 4
    assert tokenizer.decode(tokenizer("héllo wörld")["input_ids"]) == "héllo wörld"


def test_cpu_rebinds_the_torch_reference_even_when_fla_was_bound(monkeypatch):
    import transformers.models.qwen3_5.modeling_qwen3_5 as modeling

    reference = getattr(modeling.torch_chunk_gated_delta_rule, "__wrapped__",
                        modeling.torch_chunk_gated_delta_rule)

    @functools.wraps(reference)
    def pretend_fla(*args, **kwargs):  # what transformers binds when fla is importable
        raise AssertionError("a Triton kernel ran on CPU tensors")

    monkeypatch.setattr(modeling, "torch_chunk_gated_delta_rule", pretend_fla)
    assert select_kernels(torch.device("cpu")) == "torch"
    assert modeling.torch_chunk_gated_delta_rule is reference


def test_model_dtype_defaults_by_device():
    assert resolve_model_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_model_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_model_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(GdnDumpError, match="--model-dtype"):
        resolve_model_dtype("float8", torch.device("cpu"))


def test_non_hybrid_checkpoints_are_refused(tmp_path):
    from transformers import Qwen3Config

    Qwen3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=64, vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(GdnDumpError, match="not a Qwen3.5 / Qwen3-Next hybrid"):
        load_config(str(tmp_path))
    with pytest.raises(GdnDumpError, match="no such directory"):
        load_config(str(tmp_path / "missing"))
