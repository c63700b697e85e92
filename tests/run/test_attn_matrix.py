"""attn-matrix on the tiny model: exact GDN matrices, the heuristic, softmax patterns, the store."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from gdn_dump.run import attn_capture
from gdn_dump.ops.attention_reference import gdn_effective_attention_naive
from gdn_dump.cli.app import app
from gdn_dump.errors import GdnDumpError, RunFailure
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract
from gdn_dump.run.prompts import open_prompts

from ..helpers import estimated_kib, peak_above_model, reference_cache

GDN_LAYERS = (0, 1, 2)


def _attn(tiny, prompts, out, **kw):
    kw.setdefault("hooks", "")
    return extract(ExtractOptions(model="tiny", prompts=str(prompts), out=str(out), **kw), model=tiny)


def test_exact_matrices_reproduce_the_layer_and_match_the_reference(tiny, ragged_txt, tmp_path):
    _attn(tiny, ragged_txt, tmp_path / "a.zarr", attn_layers="all", batch_size=4)
    group = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    assert group.attrs["gdn_dump"]["status"] == "complete"
    for layer in GDN_LAYERS:
        arr = group[f"blocks.{layer}.attn_matrix"]
        assert arr.attrs["kind"] == "gdn_exact"
        assert arr.metadata.dimension_names == ("prompt", "v_head", "query", "key")
        assert arr.attrs["residual_max"] < 1e-5
        assert (group[f"blocks.{layer}.attn_residual"][:] < 1e-5).all()
    for p, prompt in enumerate(open_prompts(ragged_txt)):
        _, cache = reference_cache(tiny, prompt.text)
        n = int(group["prompt_length"][p])
        for layer in GDN_LAYERS:
            pre = f"blocks.{layer}.linear_attn."
            expected = gdn_effective_attention_naive(
                cache[pre + "hook_q"], cache[pre + "hook_k"], cache[pre + "hook_beta"],
                cache[pre + "hook_log_decay"], precision="float64")[0]
            stored = group[f"blocks.{layer}.attn_matrix"][p]
            np.testing.assert_allclose(stored[:, :n, :n], expected.numpy(), atol=2e-6, rtol=1e-4)
            assert not stored[:, n:, :].any() and not stored[:, :, n:].any()
            assert not np.triu(stored[:, :n, :n], k=1).any()
            # M V reproduces the layer's own recurrence output
            mv = np.einsum("hij,jhd->ihd", stored[:, :n, :n], cache[pre + "hook_v"][0].numpy())
            np.testing.assert_allclose(mv, cache[pre + "hook_recurrence_out"][0].numpy(), atol=1e-5)


def test_softmax_layer_is_its_hook_pattern(tiny, ragged_txt, tmp_path):
    _attn(tiny, ragged_txt, tmp_path / "a.zarr", attn_layers="3", batch_size=3)
    group = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    arr = group["blocks.3.attn_matrix"]
    assert arr.attrs["kind"] == "softmax"
    assert arr.metadata.dimension_names == ("prompt", "attn_head", "query", "key")
    for p, prompt in enumerate(open_prompts(ragged_txt)):
        _, cache = reference_cache(tiny, prompt.text)
        n = int(group["prompt_length"][p])
        np.testing.assert_allclose(arr[p, :, :n, :n], cache["blocks.3.attn.hook_pattern"][0].numpy(),
                                   atol=1e-6)


def test_heuristic_mode_is_transformerlens_bit_for_bit(tiny, ragged_txt, tmp_path):
    from transformer_lens.model_bridge.generalized_components.gated_delta_net import GatedDeltaNetBridge

    _attn(tiny, ragged_txt, tmp_path / "h.zarr", attn_layers="0-2", attn_mode="heuristic", batch_size=1)
    group = zarr.open_group(str(tmp_path / "h.zarr"), mode="r")
    assert group["blocks.1.attn_matrix"].attrs["kind"] == "gdn_heuristic"
    assert "blocks.1.attn_residual" not in group
    for p, prompt in enumerate(open_prompts(ragged_txt)):
        _, cache = reference_cache(tiny, prompt.text)
        n = int(group["prompt_length"][p])
        for layer in GDN_LAYERS:
            expected = tiny.bridge.blocks[layer].linear_attn.compute_effective_attention(cache, layer)[0]
            assert isinstance(tiny.bridge.blocks[layer].linear_attn, GatedDeltaNetBridge)
            assert np.array_equal(group[f"blocks.{layer}.attn_matrix"][p, :, :n, :n], expected.numpy())


def test_heads_selection_and_float64(tiny, ragged_txt, tmp_path):
    _attn(tiny, ragged_txt, tmp_path / "all.zarr", attn_layers="1", attn_method="closed_form")
    _attn(tiny, ragged_txt, tmp_path / "some.zarr", attn_layers="1", attn_heads="1,3",
          attn_precision="float64")
    full = zarr.open_group(str(tmp_path / "all.zarr"), mode="r")["blocks.1.attn_matrix"]
    some = zarr.open_group(str(tmp_path / "some.zarr"), mode="r")["blocks.1.attn_matrix"]
    assert some.shape[1] == 2 and some.attrs["heads"] == [1, 3]
    assert some.metadata.dimension_names[1] == "selected_v_head"
    np.testing.assert_allclose(some[:], full[:, [1, 3]], atol=1e-6)
    with pytest.raises(GdnDumpError, match="out of range"):
        _attn(tiny, ragged_txt, tmp_path / "bad.zarr", attn_layers="1", attn_heads="9")


def test_tiles_above_the_diagonal_or_past_the_prompt_are_never_written(tiny, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("x" * 300 + "\n" + "short\n")
    _attn(tiny, prompts, tmp_path / "a.zarr", attn_layers="0", attn_heads="0")
    chunks = tmp_path / "a.zarr" / "blocks.0.attn_matrix" / "c"
    written = sorted(str(p.relative_to(chunks)) for p in chunks.rglob("*") if p.is_file())
    # prompt 0 (300 tokens, 256-tiles): (0,0), (1,0), (1,1); prompt 1 (5 tokens): (0,0) only
    assert written == ["0/0/0/0", "0/0/1/0", "0/0/1/1", "1/0/0/0"]


def test_memory_guard_refuses_before_the_model_loads(tiny, ragged_txt, tmp_path, monkeypatch):
    import gdn_dump.run.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    result = CliRunner().invoke(app, ["attn-matrix", "-m", "tiny", "-p", str(ragged_txt), "-o",
                                      str(tmp_path / "a.zarr"), "--layer", "all", "--max-bytes", "10KB"])
    assert result.exit_code == 2, result.stderr
    assert "--max-bytes" in result.stderr and "KiB" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "a.zarr").exists()


def test_unfaithful_matrices_fail_the_run(tiny, ragged_txt, tmp_path, monkeypatch):
    real = attn_capture.gdn_effective_attention_rows  # the chunked method, block by block

    def off_by_one_percent(*args, **kwargs):
        for top, block in real(*args, **kwargs):
            yield top, block * 1.01

    monkeypatch.setattr(attn_capture, "gdn_effective_attention_rows", off_by_one_percent)
    with pytest.raises(RunFailure, match="does not reproduce"):
        _attn(tiny, ragged_txt, tmp_path / "a.zarr", attn_layers="0")
    meta = zarr.open_group(str(tmp_path / "a.zarr"), mode="r").attrs["gdn_dump"]
    assert meta["status"] == "failed" and "blocks.0.attn_matrix" in meta["failure"]
    # the heuristic is not held to the check
    _attn(tiny, ragged_txt, tmp_path / "h.zarr", attn_layers="0", attn_mode="heuristic")


def test_extract_with_attn_layers_and_xarray(tiny, ragged_txt, tmp_path):
    xr = pytest.importorskip("xarray")
    _attn(tiny, ragged_txt, tmp_path / "e.zarr", hooks="v,beta", attn_layers="1,3")
    ds = xr.open_zarr(str(tmp_path / "e.zarr"), consolidated=False)
    assert ds["blocks.1.attn_matrix"].dims == ("prompt", "v_head", "query", "key")
    assert ds["blocks.1.linear_attn.hook_v"].dims == ("token", "v_head", "d_v")
    assert ds.sizes["v_head"] == 4 and ds.sizes["attn_head"] == 4


def test_attn_matrix_cli_with_png(tmp_path, ragged_txt):
    from matplotlib.image import imread

    png = tmp_path / "png"
    result = CliRunner().invoke(app, ["attn-matrix", "-m", "tiny", "-p", str(ragged_txt), "-o",
                                      str(tmp_path / "a.zarr"), "--layer", "2,3", "--heads", "0",
                                      "--png", str(png), "--png-max-prompts", "2", "--png-log"])
    assert result.exit_code == 0, result.stderr
    files = sorted(p.name for p in png.iterdir())
    assert files == [f"prompt{p}_blocks_{layer}_attn_matrix_head0.png" for p in (0, 1) for layer in (2, 3)]
    for name in files:
        image = imread(png / name)
        assert image.shape[0] == 600 and image.shape[1] == 600
    assert "heatmaps" in result.stderr


def test_dry_run_reports_the_matrix_bytes(tmp_path, ragged_txt):
    result = CliRunner().invoke(app, ["attn-matrix", "-m", "tiny", "-p", str(ragged_txt), "-o",
                                      str(tmp_path / "a.zarr"), "--dry-run"], terminal_width=200)
    assert result.exit_code == 0, result.stderr
    assert "blocks.0.attn_matrix" in result.stdout and not (tmp_path / "a.zarr").exists()


def test_exact_matrix_memory_is_linear_in_the_length(tmp_path):
    """attn-matrix of one GDN layer (one head), one prompt of 4k and of 16k tokens: the matrix
    (64 MiB and 1 GiB on disk) is computed and written a block of rows at a time, so the peak
    above the loaded model grows about linearly (4x), not with the matrix (16x)."""
    peaks = {n: peak_above_model("tiny", n, tmp_path / f"a{n}.zarr", hooks="", command="attn-matrix",
                                 attn_layers="0", attn_heads="0", max_attn_bytes=1 << 40)
             for n in (4096, 16384)}
    assert peaks[16384] <= 5 * peaks[4096], peaks
    # the --dry-run estimate of the same (at the longer length: the run's fixed costs vary)
    estimate = estimated_kib("tiny", 16384, tmp_path, hooks="", command="attn-matrix",
                             attn_layers="0", attn_heads="0", max_attn_bytes=1 << 40)
    assert 0.5 <= estimate / peaks[16384] <= 2, (estimate, peaks)
