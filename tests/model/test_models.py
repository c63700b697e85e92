"""Model loading: the tiny model, kernel choice by device, architecture checks."""

from __future__ import annotations

import functools

import pytest
import torch

from gdn_dump.errors import GdnDumpError
from gdn_dump.model.kernels import select_kernels
from gdn_dump.model.load import load_config, resolve_model_dtype
from gdn_dump.model.tiny import build_tiny_model


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


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
])
def test_hooked_bridge_forward_equals_hf_forward_with_the_active_kernels(device):
    """Whatever backend select_kernels binds (torch on CPU; fla on CUDA when installed), the
    bridge's forward with our capture hooks attached computes what HF's own forward computes."""
    import copy

    from gdn_dump.run.capture import Capture
    from gdn_dump.catalogue import Catalogue
    from gdn_dump.model.load import wrap_model

    hf_model, tokenizer = build_tiny_model()
    bare = copy.deepcopy(hf_model).to(device)  # booting the bridge replaces hf_model's GDN modules
    loaded = wrap_model(hf_model, tokenizer, name="tiny", device=torch.device(device),
                        dtype=torch.float32)
    assert loaded.kernel_backend == select_kernels(torch.device(device))
    ids = torch.tensor([tokenizer("the same prompt, run twice " * 4)["input_ids"]], device=device)
    with torch.inference_mode():
        expected = bare(ids, use_cache=False).logits
        hooks = Catalogue(loaded.config).select("all", None)
        capture = Capture(loaded.bridge, hooks, "float32", torch.device(device))
        got_hooks = {}
        with loaded.bridge.hooks(fwd_hooks=[(h.name, lambda t, hook: got_hooks.setdefault(hook.name, t))
                                            for h in hooks]):
            logits = loaded.bridge(ids, use_cache=False)
    assert len(got_hooks) == len(hooks)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    batch = capture.run(ids.cpu(), [ids.shape[1]])  # and the capture path itself fires every hook
    batch.wait()
    assert set(batch.rows) == {h.name for h in hooks}


def test_select_kernels_binds_the_torch_reference_again_after_a_fast_kernel(monkeypatch):
    """A fast kernel's ``__wrapped__`` is its own body (fla's are decorated), so asking for
    ``torch`` after ``fla`` must bind the reference remembered from transformers, not unwrap it."""
    import functools

    import transformers.models.qwen3_5.modeling_qwen3_5 as modeling

    select_kernels(torch.device("cpu"), "torch")
    reference = modeling.torch_chunk_gated_delta_rule

    def fast_body(*args, **kwargs):
        raise AssertionError("not the reference")

    fast = functools.wraps(fast_body)(lambda *args, **kwargs: fast_body(*args, **kwargs))
    monkeypatch.setattr(modeling, "torch_chunk_gated_delta_rule", fast)  # as a bound fla kernel
    assert select_kernels(torch.device("cpu"), "torch") == "torch"
    assert modeling.torch_chunk_gated_delta_rule is reference


def test_transformers_builds_no_eager_mask_and_every_hook_is_unchanged(tiny):
    """HF_ATTENTION ("sdpa") only decides the causal mask transformers builds: TransformerLens's
    attention bridge computes attention itself. Every hook of a padded batch is bit-identical to
    the eager configuration, and no [batch, 1, L, L] mask is made."""
    from gdn_dump.model.kernels import HF_ATTENTION

    config = tiny.hf_model.config
    assert config._attn_implementation == HF_ATTENTION == "sdpa"
    assert tiny.info["hf_attn_implementation"] == "sdpa"
    ids = torch.randint(10, 200, (3, 40))
    ids[1, 25:] = 0  # right padding, as extract runs it
    seen = []
    import transformers.models.qwen3_5.modeling_qwen3_5 as masking  # where the model looks it up

    original = masking.create_causal_mask

    def recording(*args, **kwargs):
        mask = original(*args, **kwargs)
        seen.append(None if mask is None else tuple(mask.shape))
        return mask

    with torch.inference_mode():
        masking.create_causal_mask = recording
        try:
            _, fast = tiny.bridge.run_with_cache(ids, use_cache=False)
        finally:
            masking.create_causal_mask = original
        config._attn_implementation = "eager"
        try:
            _, eager = tiny.bridge.run_with_cache(ids, use_cache=False)
        finally:
            config._attn_implementation = HF_ATTENTION
    assert all(shape is None for shape in seen), seen
    assert list(fast.keys()) == list(eager.keys())
    for name in eager.keys():
        assert torch.equal(fast[name], eager[name]), name
