"""extract on the tiny model: the store equals TransformerLens's run_with_cache, prompt by prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from gdn_dump.catalogue import DEFAULT_HOOKS, GDN_HOOKS
from gdn_dump.errors import GdnDumpError, StoreError
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract
from gdn_dump.run.prompts import open_prompts

from ..helpers import save_tiny_checkpoint, reference_cache


def _run(tiny, prompts, out, **kw):
    return extract(ExtractOptions(model="tiny", prompts=str(prompts), out=str(out), **kw), model=tiny)


def _prompt_rows(group, p):
    start, length = int(group["prompt_start"][p]), int(group["prompt_length"][p])
    return slice(start, start + length)


def test_every_default_hook_equals_run_with_cache(tiny, ragged_txt, tmp_path):
    result = _run(tiny, ragged_txt, tmp_path / "s.zarr", dtype="float32", batch_size=3)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    gdn_layers = [i for i, t in enumerate(tiny.config.layer_types) if t == "linear_attention"]
    expected_names = {f"blocks.{layer}.linear_attn.{GDN_HOOKS[h][0]}"
                      for layer in gdn_layers for h in DEFAULT_HOOKS}
    assert {h.name for h in result.plan.hooks} == expected_names
    assert group.attrs["gdn_dump"]["status"] == "complete"
    prompts = list(open_prompts(ragged_txt))
    assert len(prompts) == 6 and group["prompt_id"].shape == (6,)
    for p, prompt in enumerate(prompts):
        ids, cache = reference_cache(tiny, prompt.text)
        rows = _prompt_rows(group, p)
        np.testing.assert_array_equal(group["tokens"][rows], ids.numpy())
        for name in expected_names:
            np.testing.assert_allclose(group[name][rows], cache[name][0].numpy(), atol=1e-5, rtol=0,
                                       err_msg=f"{name}, prompt {p}")


def test_batched_equals_one_prompt_at_a_time(tiny, ragged_txt, tmp_path):
    hooks = "q,k,v,beta,log_decay,recurrence_out,gate_input,out,in"
    _run(tiny, ragged_txt, tmp_path / "one.zarr", dtype="float32", batch_size=1, hooks=hooks)
    _run(tiny, ragged_txt, tmp_path / "many.zarr", dtype="float32", batch_size=8, hooks=hooks)
    one = zarr.open_group(str(tmp_path / "one.zarr"), mode="r")
    many = zarr.open_group(str(tmp_path / "many.zarr"), mode="r")
    assert sorted(one.array_keys()) == sorted(many.array_keys())
    for name in one.array_keys():
        if name == "prompt_id":
            assert list(one[name][:]) == list(many[name][:])
            continue
        np.testing.assert_allclose(one[name][:], many[name][:], atol=1e-5, rtol=0, err_msg=name)


def test_store_contract_layout(tiny, ragged_txt, tmp_path):
    result = _run(tiny, ragged_txt, tmp_path / "s.zarr", hooks="q,beta,v", layers="0,2")
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    lengths = group["prompt_length"][:]
    starts = group["prompt_start"][:]
    assert group["tokens"].shape == (lengths.sum(),) and group["tokens"].dtype == np.int32
    np.testing.assert_array_equal(starts, np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    assert list(group["prompt_id"][:]) == ["0", "1", "2", "4", "5", "6"]  # line 3 is blank
    q = group["blocks.0.linear_attn.hook_q"]
    assert q.shape == (lengths.sum(), 2, 16) and q.dtype == np.float16
    assert q.metadata.dimension_names == ("token", "k_head", "d_k")
    beta = group["blocks.2.linear_attn.hook_beta"]
    assert beta.dtype == np.float32 and beta.metadata.dimension_names == ("token", "v_head")
    assert group["blocks.2.linear_attn.hook_v"].metadata.dimension_names == ("token", "v_head", "d_v")
    assert "blocks.1.linear_attn.hook_q" not in group
    meta = group.attrs["gdn_dump"]
    assert meta["status"] == "complete"
    assert meta["layers"] == [0, 2] and meta["storage_dtype"] == "float16"
    assert meta["model"]["kernel_backend"] == "torch" and meta["model"]["name"] == "tiny"
    assert meta["prompts"]["count"] == 6 and len(meta["prompts"]["sha256"]) == 64
    for key in ("version", "libraries", "command_line", "created", "max_length", "truncated"):
        assert key in meta
    assert result.bytes_written > 0


def test_float16_storage_is_the_cast_of_the_reference(tiny, ragged_txt, tmp_path):
    _run(tiny, ragged_txt, tmp_path / "s.zarr", hooks="v,recurrence_out")
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    prompt = list(open_prompts(ragged_txt))[5]
    _, cache = reference_cache(tiny, prompt.text)
    name = "blocks.1.linear_attn.hook_v"
    np.testing.assert_array_equal(group[name][_prompt_rows(group, 5)],
                                  cache[name][0].to(torch.float16).numpy())


def test_bfloat16_storage(tiny, ragged_txt, tmp_path):
    import ml_dtypes

    _run(tiny, ragged_txt, tmp_path / "s.zarr", hooks="q", layers="0", dtype="bfloat16")
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    stored = group["blocks.0.linear_attn.hook_q"]
    meta = json.loads((tmp_path / "s.zarr" / "blocks.0.linear_attn.hook_q" / "zarr.json").read_text())
    assert meta["data_type"] == "bfloat16" and stored.dtype == ml_dtypes.bfloat16
    prompt = list(open_prompts(ragged_txt))[2]
    _, cache = reference_cache(tiny, prompt.text)
    expected = cache["blocks.0.linear_attn.hook_q"][0].to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(stored[_prompt_rows(group, 2)].view(np.int16), expected)


def test_jsonl_ids_are_kept(tiny, prompts_jsonl, tmp_path):
    path, rows = prompts_jsonl
    _run(tiny, path, tmp_path / "s.zarr", hooks="beta")
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert list(group["prompt_id"][:]) == [r["id"] for r in rows]
    lengths = [len(tiny.tokenizer(r["text"])["input_ids"]) for r in rows]
    assert list(group["prompt_length"][:]) == lengths


def test_full_hook_names_and_attention_pattern(tiny, ragged_txt, tmp_path):
    hooks = "blocks.0.hook_resid_post,blocks.3.attn.hook_pattern,blocks.1.linear_attn.hook_ssm_decay"
    _run(tiny, ragged_txt, tmp_path / "s.zarr", hooks=hooks, dtype="float32")
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    pattern = group["blocks.3.attn.hook_pattern"]
    assert pattern.metadata.dimension_names == ("prompt", "attn_head", "query", "key")
    assert pattern.attrs["kind"] == "softmax"
    assert "blocks.1.linear_attn.hook_log_decay" in group  # the alias is stored canonically
    for p, prompt in enumerate(open_prompts(ragged_txt)):
        _, cache = reference_cache(tiny, prompt.text)
        n = int(group["prompt_length"][p])
        np.testing.assert_allclose(pattern[p, :, :n, :n], cache["blocks.3.attn.hook_pattern"][0].numpy(),
                                   atol=1e-6)
        assert not pattern[p, :, n:, :].any() and not pattern[p, :, :, n:].any()
        np.testing.assert_allclose(group["blocks.0.hook_resid_post"][_prompt_rows(group, p)],
                                   cache["blocks.0.hook_resid_post"][0].numpy(), atol=1e-5)


def test_max_length_truncates_and_counts(tiny, ragged_txt, tmp_path):
    result = _run(tiny, ragged_txt, tmp_path / "s.zarr", hooks="beta", max_length=20)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert group["prompt_length"][:].max() == 20
    raw = [len(tiny.tokenizer(p.text)["input_ids"]) for p in open_prompts(ragged_txt)]
    assert result.plan.truncated == sum(n > 20 for n in raw) > 0
    assert group.attrs["gdn_dump"]["truncated"] == result.plan.truncated


def test_chunks_are_a_few_megabytes_or_as_asked(tiny, ragged_txt, tmp_path):
    result = _run(tiny, ragged_txt, tmp_path / "a.zarr", hooks="v", dry_run=True)
    spec = next(a for a in result.plan.arrays if a.name == "blocks.0.linear_attn.hook_v")
    assert spec.chunk_tokens & (spec.chunk_tokens - 1) == 0  # a power of two
    result = _run(tiny, ragged_txt, tmp_path / "b.zarr", hooks="v", chunk_tokens=32)
    group = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")
    assert group["blocks.0.linear_attn.hook_v"].chunks == (32, 4, 16)


def test_dry_run_writes_nothing(tiny, ragged_txt, tmp_path):
    result = _run(tiny, ragged_txt, tmp_path / "s.zarr", dry_run=True)
    assert not (tmp_path / "s.zarr").exists()
    assert result.plan.total_bytes > 0 and result.plan.n_prompts == 6


def test_existing_out_is_refused_without_overwrite(tiny, ragged_txt, tmp_path):
    out = tmp_path / "s.zarr"
    _run(tiny, ragged_txt, out, hooks="beta")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match="--overwrite"):
        _run(tiny, ragged_txt, out, hooks="q")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    _run(tiny, ragged_txt, out, hooks="q", overwrite=True)
    assert "blocks.0.linear_attn.hook_q" in zarr.open_group(str(out), mode="r")


def test_free_space_check(tiny, ragged_txt, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 10))
    with pytest.raises(GdnDumpError, match="--force"):
        _run(tiny, ragged_txt, tmp_path / "s.zarr", hooks="beta")
    assert not (tmp_path / "s.zarr").exists()
    _run(tiny, ragged_txt, tmp_path / "s.zarr", hooks="beta", force=True)


def test_float16_overflow_is_reported(tiny, ragged_txt, tmp_path):
    big = tiny.bridge.blocks[0].linear_attn.hook_v

    def blow_up(tensor, hook):
        return tensor * 1e9

    big.add_hook(blow_up)
    try:
        result = _run(tiny, ragged_txt, tmp_path / "s.zarr", hooks="v", layers="0")
    finally:
        big.remove_hooks()
    name = "blocks.0.linear_attn.hook_v"
    assert result.overflow.get(name, 0) > 0
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert group.attrs["gdn_dump"]["overflow"][name] == result.overflow[name]


def test_multimodal_checkpoint_loads_its_text_model(tmp_path, ragged_txt):
    from gdn_dump.model.load import load_model

    path = save_tiny_checkpoint(tmp_path / "ckpt", multimodal=True)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    assert "vision_config" in config
    model = load_model(str(path), device="cpu")
    ref = load_model("tiny", device="cpu")
    prompt = list(open_prompts(ragged_txt))[2].text
    _, cache_a = reference_cache(model, prompt)
    _, cache_b = reference_cache(ref, prompt)
    for name in ("blocks.2.linear_attn.hook_recurrence_out", "blocks.3.hook_resid_post"):
        torch.testing.assert_close(cache_a[name], cache_b[name], atol=0, rtol=0)
    extract(ExtractOptions(model=str(path), prompts=str(ragged_txt), out=str(tmp_path / "s.zarr"),
                           hooks="beta", device="cpu"))
    assert zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs["gdn_dump"]["status"] == "complete"


def test_xarray_opens_the_store_with_named_dimensions(tiny, ragged_txt, tmp_path):
    xr = pytest.importorskip("xarray")
    _run(tiny, ragged_txt, tmp_path / "s.zarr",
         hooks="q,v,beta,log_decay,recurrence_out,blocks.3.attn.hook_pattern,blocks.3.hook_resid_post")
    ds = xr.open_zarr(str(tmp_path / "s.zarr"), consolidated=False)
    assert ds["blocks.0.linear_attn.hook_q"].dims == ("token", "k_head", "d_k")
    assert ds["blocks.0.linear_attn.hook_beta"].dims == ("token", "v_head")
    assert ds["blocks.3.attn.hook_pattern"].dims == ("prompt", "attn_head", "query", "key")
    assert ds["prompt_id"].dims == ("prompt",)
    assert ds.sizes["token"] == int(ds["prompt_length"].sum())
    assert list(ds["prompt_id"].values) == ["0", "1", "2", "4", "5", "6"]


def test_a_batch_that_ran_out_of_memory_is_freed_before_the_retry(tiny, ragged_txt, tmp_path, monkeypatch):
    """The retry must not run inside the ``except`` block: the exception's traceback keeps the failed
    forward's frames, and with them its activations, alive (found on an H100: every halving ran out
    of memory again, down to a single prompt)."""
    import weakref

    from gdn_dump.run.capture import Capture

    real_run = Capture.run
    failed = []

    def small_memory(self, input_ids, lengths, *args, **kwargs):
        if failed:
            assert failed[-1]() is None, "the failed forward's tensors are alive during the retry"
        if len(lengths) > 2:
            activations = torch.empty(1 << 16)  # held by the failing frame, as a forward's are
            failed.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run(self, input_ids, lengths, *args, **kwargs)

    monkeypatch.setattr(Capture, "run", small_memory)
    result = _run(tiny, ragged_txt, tmp_path / "s.zarr", hooks="beta", batch_size=6)
    assert failed and result.oom_retries >= 1


def test_out_of_memory_halves_the_batch_and_keeps_the_store_equal(tiny, ragged_txt, tmp_path, monkeypatch):
    from gdn_dump.run.capture import Capture
    from gdn_dump.run.result import Reporter

    _run(tiny, ragged_txt, tmp_path / "ref.zarr", hooks="v,beta", attn_layers="1", batch_size=6)
    real_run = Capture.run
    sizes = []

    def small_memory(self, input_ids, lengths, *args, **kwargs):
        sizes.append(len(lengths))
        if len(lengths) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run(self, input_ids, lengths, *args, **kwargs)

    class Notes(Reporter):
        notes: list = []

        def note(self, message):
            self.notes.append(message)

    monkeypatch.setattr(Capture, "run", small_memory)
    reporter = Notes()
    result = extract(ExtractOptions(model="tiny", prompts=str(ragged_txt), out=str(tmp_path / "s.zarr"),
                                    hooks="v,beta", attn_layers="1", batch_size=6), reporter, model=tiny)
    assert sizes[0] == 6 and max(sizes[1:]) <= 3 and result.oom_retries >= 1
    assert any("out of memory on a batch of 6 prompts" in n for n in reporter.notes)
    ref = zarr.open_group(str(tmp_path / "ref.zarr"), mode="r")
    got = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    for name in ref.array_keys():
        if name != "prompt_id":
            np.testing.assert_allclose(got[name][:], ref[name][:], atol=1e-3, err_msg=name)
    assert got.attrs["gdn_dump"]["status"] == "complete" and got.attrs["gdn_dump"]["oom_retries"] >= 1

    monkeypatch.setattr(Capture, "run", lambda self, *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError()))
    from gdn_dump.errors import RunFailure

    with pytest.raises(RunFailure, match="single prompt"):
        _run(tiny, ragged_txt, tmp_path / "t.zarr", hooks="beta")
    assert zarr.open_group(str(tmp_path / "t.zarr"), mode="r").attrs["gdn_dump"]["status"] == "in_progress"
