"""Resume: a killed and resumed run records exactly the counts of an uninterrupted one, and gives
its store; a resume with other settings is refused before anything loads.

Each progress record carries what the rows before it took (overflow, NaN/inf, padding, prompts,
tokens, residuals, retries, time), snapshotted at the same unit boundary as the rows it records;
``--resume`` continues from it. The kill is simulated in-process at the same point as
``GDN_DUMP_FAULT=after-checkpoint:N`` (right after the record is written, nothing more is
written); tests/run/test_distributed.py kills real processes with SIGKILL.
"""

from __future__ import annotations

import random

import pytest
import torch
import zarr

from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract

from ..helpers import Killed, assert_same_prompts, kill_at

WORDS = ["alpha", "b", "gamma delta", "é", "zz", "the quick"]
HOOKS = "v,q,beta,log_decay"
OVERFLOWING = "blocks.0.linear_attn.hook_v"
POISONED = "blocks.1.linear_attn.hook_q"


@pytest.fixture()
def noisy(tiny):
    """Hooks that make float16 overflow and NaN depend on the values only (not on how many
    batches ran), so an uninterrupted run and a resumed one see the same ones."""
    def overflow(tensor, hook):
        return tensor * 1e7  # |v| > 0.0066 (about 1 in 50 values) overflows float16

    def poison(tensor, hook):
        return torch.where(tensor.abs() > 0.008, torch.nan, tensor)  # about 1 in 100

    tiny.bridge.blocks[0].linear_attn.hook_v.add_hook(overflow)
    tiny.bridge.blocks[1].linear_attn.hook_q.add_hook(poison)
    yield tiny
    tiny.bridge.blocks[0].linear_attn.hook_v.remove_hooks()
    tiny.bridge.blocks[1].linear_attn.hook_q.remove_hooks()


def _prompts(path, n=14):
    rng = random.Random(3)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
                              for _ in range(n)) + "\n", encoding="utf-8")
    return path


def _extract(model, prompts, out, **kw):
    # One batch per unit (file order) and a record at every unit end: many resume points.
    return extract(ExtractOptions(model="tiny", prompts=str(prompts), out=str(out), hooks=HOOKS,
                                  layers="0,1", batch_size=3, sort_window_bytes=0,
                                  checkpoint_every=0, attn_layers="0", **kw), model=model)


COUNTS = ("overflow", "nonfinite", "padding", "oom_retries")


@pytest.mark.parametrize("point", ["after-checkpoint:1", "after-checkpoint:3"])
def test_killed_and_resumed_run_records_the_uninterrupted_counts(noisy, tmp_path, monkeypatch,
                                                                 point):
    prompts = _prompts(tmp_path / "p.txt")
    clean = _extract(noisy, prompts, tmp_path / "clean.zarr")
    whole = zarr.open_group(str(tmp_path / "clean.zarr"), mode="r").attrs["gdn_dump"]
    assert whole["overflow"][OVERFLOWING] > 0 and whole["nonfinite"][POISONED] > 0  # meaningful

    out = tmp_path / "killed.zarr"
    kill_at(monkeypatch, point)
    with pytest.raises(Killed):
        _extract(noisy, prompts, out)
    monkeypatch.undo()
    killed = zarr.open_group(str(out), mode="r")
    record = dict(killed["_progress/region-00000"].attrs)
    assert 0 < record["resume_from"] < 14 and not record["done"]
    partial = record["tally"]
    assert 0 < partial["overflow"][OVERFLOWING] < whole["overflow"][OVERFLOWING]

    resumed = _extract(noisy, prompts, out, resume=True)
    meta = zarr.open_group(str(out), mode="r").attrs["gdn_dump"]
    assert meta["status"] == "complete"
    for key in COUNTS:
        assert meta[key] == whole[key], key
    # the statistics, too, continue from the record (float64 sums in the same order: equal)
    group, ref = zarr.open_group(str(out), mode="r"), zarr.open_group(str(tmp_path / "clean.zarr"), mode="r")
    for name in (OVERFLOWING, POISONED, "blocks.0.linear_attn.hook_beta"):
        assert group[name].attrs["stats"] == ref[name].attrs["stats"], name
    # the result: the region's counts over both runs; this run's work only
    assert resumed.overflow == clean.overflow and resumed.nonfinite == clean.nonfinite
    assert resumed.residuals == clean.residuals and resumed.padding == clean.padding
    assert resumed.tokens + partial["tokens"] == clean.tokens
    assert resumed.prompts + partial["prompts"] == clean.prompts == 14
    # time adds up over the runs instead of restarting
    assert meta["seconds"] >= partial["seconds"] > 0


def test_a_record_counts_exactly_the_rows_before_it(noisy, tmp_path, monkeypatch):
    """The counts of a record are those of the prompts before its resume_from, not of whatever
    the sink had seen when the writer thread got to it."""
    prompts = _prompts(tmp_path / "p.txt")
    kill_at(monkeypatch, "after-checkpoint:2")
    with pytest.raises(Killed):
        _extract(noisy, prompts, tmp_path / "k.zarr")
    monkeypatch.undo()
    record = dict(zarr.open_group(str(tmp_path / "k.zarr"), mode="r")["_progress/region-00000"].attrs)
    lengths = zarr.open_group(str(tmp_path / "k.zarr"), mode="r")["prompt_length"][:]
    upto = record["resume_from"]
    assert record["tally"]["prompts"] == upto
    assert record["tally"]["tokens"] == int(lengths[:upto].sum()) == record["tokens"]


def test_a_resume_with_other_settings_is_refused_before_the_weights_load(noisy, tmp_path, monkeypatch):
    import gdn_dump.run.pipeline as pipeline
    from gdn_dump.errors import StoreError

    prompts = _prompts(tmp_path / "p.txt")
    kill_at(monkeypatch, "after-checkpoint:1")
    with pytest.raises(Killed):
        _extract(noisy, prompts, tmp_path / "k.zarr")
    monkeypatch.undo()

    def load_model(*args, **kwargs):
        raise AssertionError("the weights were loaded before the settings were compared")

    monkeypatch.setattr(pipeline, "load_model", load_model)
    with pytest.raises(StoreError, match=r"different settings; .*hooks"):
        extract(ExtractOptions(model="tiny", prompts=str(prompts), out=str(tmp_path / "k.zarr"),
                               hooks="beta", layers="0,1", batch_size=3, sort_window_bytes=0,
                               checkpoint_every=0, attn_layers="0", resume=True))


@pytest.mark.parametrize("point", ["after-create", "before-finalize"])
def test_killed_before_or_after_the_rows_resumes_to_the_same_store(tiny, tmp_path, monkeypatch, point):
    """Killed once the store exists but before any record, or once every record is written but
    before the store is marked complete: --resume gives the uninterrupted store."""
    prompts = _prompts(tmp_path / "p.txt")
    _extract(tiny, prompts, tmp_path / "clean.zarr")
    out = tmp_path / "killed.zarr"
    kill_at(monkeypatch, point)
    with pytest.raises(Killed):
        _extract(tiny, prompts, out)
    monkeypatch.undo()
    assert zarr.open_group(str(out), mode="r").attrs["gdn_dump"]["status"] == "in_progress"
    _extract(tiny, prompts, out, resume=True)
    assert_same_prompts(tmp_path / "clean.zarr", out)


def test_a_resume_with_other_settings_is_one_line_and_leaves_the_store(tiny, tmp_path, monkeypatch):
    """Through the command line: exit 2, one line listing the differences, no traceback, the
    store untouched; and an existing store without --resume or --overwrite is refused."""
    from typer.testing import CliRunner

    from gdn_dump.cli.app import app

    prompts, out = _prompts(tmp_path / "p.txt"), tmp_path / "s.zarr"
    kill_at(monkeypatch, "after-checkpoint:2")
    with pytest.raises(Killed):
        _extract(tiny, prompts, out)
    monkeypatch.undo()
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    args = ["extract", "-m", "tiny", "-p", str(prompts), "-o", str(out), "-q"]
    refused = CliRunner().invoke(app, [*args, "--resume", "--hooks", "q,beta"])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "different settings" in refused.stderr and "hooks" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert zarr.open_group(str(out), mode="r").attrs["gdn_dump"]["status"] == "in_progress"
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.stderr
