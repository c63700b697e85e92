"""Softmax attention without an L x L matrix (gdn_dump.model.attention) against TransformerLens's
explicit path: every hook, on tiny and on a checkpoint whose attention layer sits between GDN
layers; extract equals run_with_cache of each prompt alone; memory linear in the prompt's length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from gdn_dump.model.attention import BRIDGE, SDPA, memory_efficient_attention
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract

from ..helpers import RAGGED_PROMPTS, estimated_kib, peak_above_model, reference_cache

BETWEEN = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
TOLERANCE = 1e-5  # relative to the array's largest value, float32 (measured: 4e-7 on tiny)


def build_between(path: Path | None = None):
    """A tiny random Qwen3.5 with softmax attention at layers 1 and 3, GDN at 0 and 2 (loaded, or
    saved to ``path`` and returned as a directory)."""
    from transformers import Qwen3_5ForCausalLM

    from gdn_dump.model.load import wrap_model
    from gdn_dump.model.tiny import build_tiny_tokenizer, set_gates, tiny_text_config

    tokenizer = build_tiny_tokenizer()
    config = tiny_text_config(tokenizer)
    config.layer_types = BETWEEN
    torch.manual_seed(2)
    model = Qwen3_5ForCausalLM(config).eval()
    set_gates(model)
    if path is not None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path
    return wrap_model(model, tokenizer, name="between", device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def between():
    return build_between()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-30))


@pytest.mark.parametrize("which", ["tiny", "between"])
def test_every_hook_equals_the_explicit_path(tiny, between, which):
    model = {"tiny": tiny, "between": between}[which]
    ids = torch.randint(10, 200, (3, 90))
    ids[1, 50:] = 0  # right padding, as extract runs it
    with torch.inference_mode():
        _, explicit = model.bridge.run_with_cache(ids, use_cache=False)
        with memory_efficient_attention(model.bridge) as swapped:
            _, fast = model.bridge.run_with_cache(ids, use_cache=False)
        _, restored = model.bridge.run_with_cache(ids, use_cache=False)
    assert len(swapped) == sum(t == "full_attention" for t in model.config.layer_types)
    patterns = {n for n in explicit.keys() if n.endswith(("hook_pattern", "hook_attn_scores"))}
    assert set(explicit.keys()) - set(fast.keys()) == patterns  # only the patterns do not fire
    worst = max(_relative(fast[n], explicit[n]) for n in fast.keys())
    assert worst <= TOLERANCE, worst
    assert all(torch.equal(restored[n], explicit[n]) for n in explicit.keys())  # swapped back


def test_extract_equals_run_with_cache_and_records_the_path(between, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(RAGGED_PROMPTS) + "\n", encoding="utf-8")
    hooks = "default,blocks.1.attn.hook_z,blocks.3.hook_resid_post"
    out = tmp_path / "fast.zarr"
    result = extract(ExtractOptions(model="between", prompts=str(prompts), out=str(out), hooks=hooks,
                                    dtype="float32", batch_size=3), model=between)
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["gdn_dump"]["softmax_attention"] == SDPA
    for p, text in enumerate(t for t in RAGGED_PROMPTS if t.strip()):
        _, cache = reference_cache(between, text)  # TransformerLens's explicit path, alone
        start, n = int(group["prompt_start"][p]), int(group["prompt_length"][p])
        for hook in (h.name for h in result.plan.hooks):
            got, want = group[hook][start:start + n], cache[hook][0].numpy()
            assert _relative(torch.from_numpy(got), torch.from_numpy(want)) <= TOLERANCE, (hook, p)
    # a pattern asked for: the explicit path, recorded
    extract(ExtractOptions(model="between", prompts=str(prompts), out=str(tmp_path / "exact.zarr"),
                           hooks="beta,blocks.1.attn.hook_pattern", batch_size=3), model=between)
    exact = zarr.open_group(str(tmp_path / "exact.zarr"), mode="r")
    assert exact.attrs["gdn_dump"]["softmax_attention"] == BRIDGE


def test_memory_of_a_gdn_layer_after_an_attention_layer_is_linear_in_the_length(tmp_path):
    """Peak RSS above the loaded model, one prompt of 4k and of 16k tokens through layer 2 (GDN),
    after the attention layer 1: linear would be 4x (measured before: 14x)."""
    path = build_between(tmp_path / "between")
    peaks = {n: peak_above_model(path, n, tmp_path / f"s{n}.zarr", hooks="beta", layers="2")
             for n in (4096, 16384)}
    assert peaks[16384] <= 5 * peaks[4096], peaks
    # the --dry-run estimate of the same (at the longer length: the run's fixed costs vary)
    estimate = estimated_kib(path, 16384, tmp_path, hooks="beta", layers="2")
    assert 0.5 <= estimate / peaks[16384] <= 2, (estimate, peaks)
