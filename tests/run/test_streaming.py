"""A prompt too long to hold streams: its rows go to the writer, in pieces, as the hooks fire.

Streaming changes where rows wait, never what is stored: a streamed run's store equals the held
run's bit for bit (every prompt alone in its batch, so the batch partners are the same), its rows
equal ``run_with_cache`` of the prompt alone, a killed streamed run resumes to the same store,
and its peak memory does not carry the prompt's rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import gdn_dump.run.capture as capture
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract
from gdn_dump.run.sink import BatchSink

from ..helpers import (RAGGED_PROMPTS, Killed, assert_same_prompts, estimated_kib, kill_at,
                       peak_above_model, reference_cache)

STREAM_FROM = 40  # tokens: the sorting window is this many tokens of rows


@pytest.fixture()
def pieces(monkeypatch):
    """Small pieces (several per array and prompt); yields the (prompt, array) of each piece."""
    seen = []
    write = BatchSink._write_piece

    def record(self, piece):
        seen.append((piece.prompt, piece.name))
        write(self, piece)

    monkeypatch.setattr(capture, "PIECE_BYTES", 2048)
    monkeypatch.setattr(BatchSink, "_write_piece", record)
    return seen


def _extract(model, prompts, out, **kw):
    kw = {"batch_size": 1, "overwrite": True, **kw}
    return extract(ExtractOptions(model="tiny", prompts=str(prompts), out=str(out), **kw), model=model)


def _window(model, prompts, tmp_path, **kw) -> int:
    """``--sort-window`` bytes for which prompts of ``STREAM_FROM`` tokens or more stream."""
    probe = _extract(model, prompts, tmp_path / "probe.zarr", dry_run=True, **kw)
    return STREAM_FROM * probe.plan.bytes_per_token


def _long(store) -> list[int]:
    lengths = zarr.open_group(str(store), mode="r")["prompt_length"][:]
    return [p for p, n in enumerate(lengths) if n >= STREAM_FROM]


@pytest.mark.parametrize("kw", [dict(hooks="default,ssm_state", state_every=16, attn_layers="1"),
                                dict(hooks="v,beta,blocks.3.hook_resid_post", dtype="bfloat16")],
                         ids=["states-and-matrix", "through-attention"])
def test_a_streamed_store_equals_the_held_one_bit_for_bit(tiny, ragged_txt, tmp_path, pieces, kw):
    held = _extract(tiny, ragged_txt, tmp_path / "held.zarr", **kw)
    streamed = _extract(tiny, ragged_txt, tmp_path / "streamed.zarr",
                        sort_window_bytes=_window(tiny, ragged_txt, tmp_path, **kw), **kw)
    long = _long(tmp_path / "held.zarr")
    assert 2 <= len(long) < held.prompts  # some prompts stream, some do not
    assert sorted({p for p, _ in pieces}) == long  # exactly the long ones, in pieces
    arrays = {name for _, name in pieces}
    assert {a.name for a in held.plan.arrays if a.stream in ("token", "state")} - arrays == {"tokens"}
    assert max(sum(1 for q in pieces if q == (p, name)) for p in long for name in arrays) > 1
    assert_same_prompts(tmp_path / "held.zarr", tmp_path / "streamed.zarr")
    a, b = (zarr.open_group(str(tmp_path / s), mode="r") for s in ("held.zarr", "streamed.zarr"))
    for name, array in a.arrays():  # the statistics, accumulated piece by piece
        if "stats" in array.attrs:
            _assert_close(b[name].attrs["stats"], array.attrs["stats"], name)
        if array.metadata.dimension_names[0] == "prompt":  # matrices and residuals
            np.testing.assert_array_equal(b[name][:], array[:], err_msg=name)
    assert streamed.tokens == held.tokens and streamed.padding == held.padding == 0


def _assert_close(a, b, where: str) -> None:
    """JSON values equal, numbers up to float64 summation order."""
    if isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for key in b:
            _assert_close(a[key], b[key], f"{where}:{key}")
    elif isinstance(b, list) and b and isinstance(b[0], str):
        assert a == b, where
    elif isinstance(b, (list, int, float)) and not isinstance(b, bool):
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-9,
                                   atol=1e-12, err_msg=where)
    else:
        assert a == b, where


def test_streamed_rows_equal_run_with_cache_of_the_prompt_alone(tiny, ragged_txt, tmp_path, pieces):
    hooks = "default"
    _extract(tiny, ragged_txt, tmp_path / "s.zarr", hooks=hooks, dtype="float32", batch_size=4,
             sort_window_bytes=_window(tiny, ragged_txt, tmp_path, hooks=hooks, dtype="float32"))
    store = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    texts = [t for t in RAGGED_PROMPTS if t.strip()]
    streamed = _long(tmp_path / "s.zarr")
    assert streamed and {p for p, _ in pieces} == set(streamed)
    names = [n for n in store.array_keys() if n.startswith("blocks.")]
    for p in streamed:
        ids, cache = reference_cache(tiny, texts[p])
        start, n = int(store["prompt_start"][p]), int(store["prompt_length"][p])
        np.testing.assert_array_equal(store["tokens"][start:start + n], ids.numpy())
        for name in names:
            expected = cache[name][0].float().numpy()
            np.testing.assert_allclose(store[name][start:start + n], expected, rtol=0,
                                       atol=1e-5 * max(np.abs(expected).max(), 1), err_msg=name)


def test_a_killed_streamed_run_resumes_to_the_same_store(tiny, ragged_txt, tmp_path, monkeypatch):
    kw = dict(hooks="q,v,beta,ssm_state", state_every=8, checkpoint_every=0)
    window = _window(tiny, ragged_txt, tmp_path, **kw)
    _extract(tiny, ragged_txt, tmp_path / "ref.zarr", **kw)
    monkeypatch.setattr(capture, "PIECE_BYTES", 2048)
    kill_at(monkeypatch, "after-checkpoint:3")  # past the first streamed prompt (prompt 2)
    with pytest.raises(Killed):
        _extract(tiny, ragged_txt, tmp_path / "k.zarr", sort_window_bytes=window, **kw)
    monkeypatch.undo()
    monkeypatch.setattr(capture, "PIECE_BYTES", 2048)
    _extract(tiny, ragged_txt, tmp_path / "k.zarr", sort_window_bytes=window, resume=True,
             **{**kw, "overwrite": False})
    assert_same_prompts(tmp_path / "ref.zarr", tmp_path / "k.zarr")


def build_wide(path, layers: int = 24):
    """A random Qwen3.5 of ``layers`` GDN layers with wide heads (16 value heads of 64, 4 key heads
    of 64) and hidden size 64: its default hooks are ~8 KB a token and layer, and the forward
    holds one layer at a time."""
    from transformers import Qwen3_5ForCausalLM

    from gdn_dump.model.tiny import build_tiny_tokenizer, set_gates, tiny_text_config

    tokenizer = build_tiny_tokenizer()
    config = tiny_text_config(tokenizer)
    config.update(dict(num_hidden_layers=layers, layer_types=["linear_attention"] * layers,
                       linear_num_value_heads=16, linear_value_head_dim=64,
                       linear_num_key_heads=4, linear_key_head_dim=64))
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(config).eval()
    set_gates(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_streamed_prompt_does_not_hold_its_rows(tmp_path):
    """Peak RSS above the loaded model, one prompt of 2,048 tokens, default hooks of 24 wide GDN
    layers (about 420 MB of rows): streamed, the run costs what the forward alone costs
    (``--hooks beta``, a few KB of rows); held, the rows come on top. Chunks of 64 rows: the
    writer's chunk buffers (one per array) stay small beside the rows, as they do at long L.
    Measured twice: forward 263 / 339 MiB (its own noise), streamed 291 / 292, held 639 / 645."""
    path = build_wide(tmp_path / "wide")
    length, chunks = 2048, dict(chunk_tokens=64)
    forward = peak_above_model(path, length, tmp_path / "f.zarr", hooks="beta", **chunks)
    streamed = peak_above_model(path, length, tmp_path / "s.zarr", sort_window_bytes=16 << 20, **chunks)
    held = peak_above_model(path, length, tmp_path / "h.zarr", sort_window_bytes=1 << 40, **chunks)
    rows = sum(a.nbytes for _, a in zarr.open_group(str(tmp_path / "s.zarr"), mode="r").arrays()) // 1024
    assert rows > 300 << 10  # KiB: the rows are most of the run
    assert streamed - forward < 0.25 * rows, (forward, streamed, held, rows)
    assert held - streamed > 0.5 * rows, (forward, streamed, held, rows)  # the test can tell
    estimate = estimated_kib(path, length, tmp_path, sort_window_bytes=16 << 20, **chunks)  # --dry-run's
    assert 0.5 <= estimate / streamed <= 2, (estimate, streamed)


def test_dry_run_reports_memory_per_prompt_length(ragged_txt, tmp_path):
    from typer.testing import CliRunner

    from gdn_dump.cli.app import app

    result = CliRunner().invoke(app, ["extract", "-m", "tiny", "-p", str(ragged_txt), "-o",
                                      str(tmp_path / "s.zarr"), "--dry-run", "--sort-window", "64MiB"],
                                terminal_width=200)
    assert result.exit_code == 0, result.stderr
    assert "memory for one prompt" in result.stdout and not (tmp_path / "s.zarr").exists()
    lines = {ln.split("│")[1].strip(): ln for ln in result.stdout.splitlines()
             if ln.startswith("│") and ln.split("│")[1].strip().replace(",", "").isdigit()}
    assert {"4,096", "32,768", "131,072"} <= lines.keys()
    assert "streamed" in lines["131,072"] and "streamed" not in lines["4,096"]


@pytest.mark.parametrize("family", ["tiny", "qwen3_5_moe_text", "qwen3_next"])
def test_the_estimate_counts_the_parameters_exactly(family):
    from gdn_dump.model.tiny import build_tiny_model
    from gdn_dump.run.memory import parameter_count

    from ..model.families import build_family

    model, _ = build_tiny_model() if family == "tiny" else build_family(family)
    assert parameter_count(model.config) == sum(p.numel() for p in model.parameters())
