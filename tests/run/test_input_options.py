"""Options for imperfect input and output: --on-long, --encoding-errors, non-finite values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from gdn_dump.cli.app import app
from gdn_dump.errors import GdnDumpError, RunFailure
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract


def _run(tiny, prompts, out, **kw):
    return extract(ExtractOptions(model="tiny", prompts=str(prompts), out=str(out), **kw), model=tiny)


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line(result, code):
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


def _rows(group, name, p):
    start, length = int(group["prompt_start"][p]), int(group["prompt_length"][p])
    return group[name][start:start + length]


# ---------------------------------------------------------------- --on-long


def test_on_long_skip_stores_long_prompts_without_tokens(tiny, ragged_txt, tmp_path):
    """ragged_txt's prompts 2, 3 and 4 are over 20 tokens: skipped, the others equal a full run."""
    result = _run(tiny, ragged_txt, tmp_path / "s.zarr", hooks="v,beta", max_length=20, on_long="skip")
    _run(tiny, ragged_txt, tmp_path / "ref.zarr", hooks="v,beta")
    got, ref = (zarr.open_group(str(tmp_path / n), mode="r") for n in ("s.zarr", "ref.zarr"))
    ref_lengths = ref["prompt_length"][:]
    long = ref_lengths > 20
    assert long.sum() == 3 and result.plan.skipped == 3 and result.plan.truncated == 0
    np.testing.assert_array_equal(got["prompt_length"][:], np.where(long, 0, ref_lengths))
    for p in np.flatnonzero(~long):  # batch widths differ: float32 rounding, not values, may differ
        for name in ("blocks.0.linear_attn.hook_v", "blocks.2.linear_attn.hook_beta"):
            np.testing.assert_allclose(_rows(got, name, p), _rows(ref, name, p), rtol=1e-5, atol=1e-6)
    meta = got.attrs["gdn_dump"]
    assert meta["status"] == "complete" and meta["skipped_long"] == 3 and meta["on_long"] == "skip"


def test_on_long_error_names_the_prompt_before_anything_is_written(ragged_txt, tmp_path):
    out = tmp_path / "s.zarr"
    err = _one_line(_cli("extract", "-m", "tiny", "-p", ragged_txt, "-o", out, "--hooks", "beta",
                         "--max-length", "20", "--on-long", "error", "-q"), 2)
    # the first long prompt is the third line: 'The quick brown fox ...'
    assert "prompts.txt: prompt 2 (line 3, id '2') has" in err and "--max-length 20" in err
    assert "3 prompt(s) in all" in err and not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--on-long", "skip"], "--on-long skip needs --max-length"),
    (["--on-long", "drop", "--max-length", "5"], "--on-long must be one of truncate, skip, error"),
    (["--encoding-errors", "ignore"], "encoding"),
])
def test_bad_option_values_are_one_line(ragged_txt, tmp_path, args, message):
    out = tmp_path / "s.zarr"
    err = _one_line(_cli("extract", "-m", "tiny", "-p", ragged_txt, "-o", out, "--hooks", "beta",
                         "-q", *args), 2)
    assert message in err and not out.exists()


# ---------------------------------------------------------------- --encoding-errors


def test_encoding_errors_replace_goes_on_and_counts_the_lines(tmp_path):
    prompts = tmp_path / "bad.txt"
    prompts.write_bytes(b"good line\nbad \xff byte\nalso \xfe\xfd bad\nfine\n")
    out = tmp_path / "s.zarr"
    err = _one_line(_cli("extract", "-m", "tiny", "-p", prompts, "-o", out, "--hooks", "beta", "-q"), 2)
    assert "line 2: invalid UTF-8" in err and not out.exists()

    result = _cli("extract", "-m", "tiny", "-p", prompts, "-o", out, "--hooks", "beta",
                  "--encoding-errors", "replace")
    assert result.exit_code == 0, result.stderr
    assert "lines with invalid UTF-8 (replaced)" in result.stderr
    meta = zarr.open_group(str(out), mode="r").attrs["gdn_dump"]
    assert meta["status"] == "complete" and meta["prompts"]["count"] == 4
    assert meta["prompts"]["replaced_lines"] == 2 and meta["prompts"]["encoding_errors"] == "replace"


# ---------------------------------------------------------------- non-finite values


@pytest.fixture()
def poisoned(tiny):
    """Five NaNs and two infs in layer 0's v (model output), on the first batch only."""
    hook = tiny.bridge.blocks[0].linear_attn.hook_v
    calls = []

    def poison(tensor, hook):
        calls.append(1)
        if len(calls) > 1:
            return tensor
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        flat = tensor.view(-1)
        flat[:5] = float("nan")
        flat[5:7] = float("inf")
        return tensor

    hook.add_hook(poison)
    yield "blocks.0.linear_attn.hook_v"
    hook.remove_hooks()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_nonfinite_values_are_counted_per_array(tiny, ragged_txt, tmp_path, poisoned, dtype):
    # The first batch holds every prompt: the poisoned flat positions are real rows of prompt 0..
    result = _run(tiny, ragged_txt, tmp_path / "s.zarr", hooks="v,beta", layers="0", dtype=dtype,
                  batch_size=8, sort_window_bytes=0)
    assert result.nonfinite == {poisoned: 7}
    assert result.overflow == {}  # NaN/inf from the model are not float16 overflow
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    meta = group.attrs["gdn_dump"]
    assert meta["status"] == "complete" and meta["nonfinite"] == {poisoned: 7}
    stored = group[poisoned][:]
    assert int((~np.isfinite(stored)).sum()) == 7


def test_fail_on_nonfinite_stops_before_writing_the_batch(tiny, ragged_txt, tmp_path, poisoned):
    with pytest.raises(RunFailure, match=r"7 NaN/inf values in blocks\.0\.linear_attn\.hook_v .*"
                                         r"--fail-on-nonfinite; the store stays in_progress"):
        _run(tiny, ragged_txt, tmp_path / "s.zarr", hooks="v", layers="0", fail_on_nonfinite=True)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert group.attrs["gdn_dump"]["status"] == "in_progress"
    assert not np.isnan(group[poisoned][:]).any()  # the poisoned rows never reached the store


def test_fail_on_nonfinite_on_the_command_line_is_exit_1(ragged_txt, tmp_path, monkeypatch):
    from gdn_dump.run.capture import Capture

    real_hook_fn = Capture._hook_fn

    def nan_everywhere(self, spec):
        keep = real_hook_fn(self, spec)
        return lambda tensor, hook: keep(torch.full_like(tensor, float("nan")), hook)

    monkeypatch.setattr(Capture, "_hook_fn", nan_everywhere)
    out = tmp_path / "s.zarr"
    err = _one_line(_cli("extract", "-m", "tiny", "-p", ragged_txt, "-o", out, "--hooks", "beta",
                         "--layers", "0", "--fail-on-nonfinite", "-q"), 1)
    assert "NaN/inf values in blocks.0.linear_attn.hook_beta" in err


def test_finite_values_cost_no_count(tiny, ragged_txt, tmp_path):
    result = _run(tiny, ragged_txt, tmp_path / "s.zarr", hooks="v,beta", dtype="float32")
    assert result.nonfinite == {} and result.overflow == {}
    assert zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs["gdn_dump"]["nonfinite"] == {}


def test_on_long_without_max_length_is_refused_by_the_library(tiny, ragged_txt, tmp_path):
    with pytest.raises(GdnDumpError, match="needs --max-length"):
        _run(tiny, ragged_txt, tmp_path / "s.zarr", hooks="beta", on_long="error")


def test_a_prompt_past_the_models_context_is_refused_naming_it(tiny, ragged_txt, tmp_path, monkeypatch):
    monkeypatch.setattr(tiny.config, "max_position_embeddings", 40)  # tiny's is Qwen3.5's 262144
    with pytest.raises(GdnDumpError, match=r"prompt 2 .* has \d+ tokens, over the model's "
                                           r"max_position_embeddings 40 .*pass --max-length 40"):
        _run(tiny, ragged_txt, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()
    _run(tiny, ragged_txt, tmp_path / "s.zarr", max_length=40)  # truncated: within the context
    assert int(zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["prompt_length"][:].max()) == 40
