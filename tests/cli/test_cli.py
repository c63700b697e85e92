"""The command line: extract, hooks, inspect, --dry-run, --config, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from gdn_dump.cli.app import app


@pytest.fixture()
def runner():
    return CliRunner()


def _ok(result):
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def test_extract_then_inspect(runner, ragged_txt, tmp_path):
    out = tmp_path / "s.zarr"
    result = _ok(runner.invoke(app, ["extract", "--model", "tiny", "--prompts", str(ragged_txt),
                                     "--out", str(out), "--hooks", "beta,log_decay", "--layers", "0-1"]))
    assert "token rows" in result.stderr  # the summary table
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["gdn_dump"]["status"] == "complete"
    assert group.attrs["gdn_dump"]["command_line"][0] == "gdn-dump"
    shown = _ok(runner.invoke(app, ["inspect", str(out)], terminal_width=200)).stdout
    for text in ("status: complete", "blocks.1.linear_attn.hook_log_decay", "prompt_id",
                 "token,v_head", "float32", "kernels: torch"):
        assert text in shown, text


def test_quiet_prints_nothing(runner, ragged_txt, tmp_path):
    result = _ok(runner.invoke(app, ["extract", "-m", "tiny", "-p", str(ragged_txt), "-o",
                                     str(tmp_path / "s.zarr"), "--hooks", "beta", "--quiet"]))
    assert result.stdout == "" and result.stderr == ""


def test_hooks_lists_the_catalogue(runner):
    shown = _ok(runner.invoke(app, ["hooks", "--model", "tiny"], terminal_width=250)).stdout
    for text in ("blocks.0.linear_attn.hook_beta", "[4]", "blocks.2.linear_attn.hook_q", "[2, 16]",
                 "blocks.3.attn.hook_pattern", "attention_matrix", "recurrence_out", "gdn", "attention"):
        assert text in shown, text


def test_dry_run_prints_the_plan_and_writes_nothing(runner, ragged_txt, tmp_path):
    out = tmp_path / "s.zarr"
    result = _ok(runner.invoke(app, ["extract", "-m", "tiny", "-p", str(ragged_txt), "-o", str(out),
                                     "--dry-run"], terminal_width=250))
    assert not out.exists()
    assert "blocks.0.linear_attn.hook_q_pre_conv" in result.stdout
    assert "uncompressed" in result.stdout and "6 prompts" in result.stdout


def test_existing_out_is_one_line_and_exit_2(runner, ragged_txt, tmp_path):
    out = tmp_path / "s.zarr"
    args = ["extract", "-m", "tiny", "-p", str(ragged_txt), "-o", str(out), "--hooks", "beta", "-q"]
    _ok(runner.invoke(app, args))
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr
    _ok(runner.invoke(app, args + ["--overwrite"]))


@pytest.mark.parametrize("extra, needle", [
    (["--hooks", "betta"], "did you mean beta"),
    (["--layers", "9"], "out of range"),
    (["--hooks", "beta", "--layers", "3"], "softmax-attention layer"),
    (["--dtype", "float8"], "--dtype"),
    (["--compressor", "lzma"], "--compressor"),
])
def test_selection_errors_are_one_line(runner, ragged_txt, tmp_path, extra, needle):
    result = runner.invoke(app, ["extract", "-m", "tiny", "-p", str(ragged_txt), "-o",
                                 str(tmp_path / "s.zarr"), *extra])
    assert result.exit_code == 2, result.stderr
    assert needle in result.stderr and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "s.zarr").exists()


def test_missing_prompt_file(runner, tmp_path):
    result = runner.invoke(app, ["extract", "-m", "tiny", "-p", str(tmp_path / "nope.txt"), "-o",
                                 str(tmp_path / "s.zarr")])
    assert result.exit_code == 2 and "nope.txt" in result.stderr


def test_config_file_with_command_line_override(runner, ragged_txt, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('model = "tiny"\nhooks = ["beta", "q"]\nlayers = "0"\ndtype = "float32"\n'
                      'batch-size = 2\nquiet = true\n')
    out = tmp_path / "s.zarr"
    _ok(runner.invoke(app, ["extract", "--config", str(config), "-p", str(ragged_txt), "-o", str(out),
                            "--layers", "1"]))
    group = zarr.open_group(str(out), mode="r")
    assert sorted(k for k in group.array_keys() if k.startswith("blocks")) == [
        "blocks.1.linear_attn.hook_beta", "blocks.1.linear_attn.hook_q"]
    assert group["blocks.1.linear_attn.hook_q"].dtype == np.float32
    assert group.attrs["gdn_dump"]["batch_size"] == 2
    bad = tmp_path / "bad.toml"
    bad.write_text('modle = "tiny"\n')
    result = runner.invoke(app, ["extract", "--config", str(bad), "-p", str(ragged_txt), "-o", str(out)])
    assert result.exit_code == 2 and "modle" in result.stderr


def test_prompts_from_stdin(runner, tmp_path):
    out = tmp_path / "s.zarr"
    _ok(runner.invoke(app, ["extract", "-m", "tiny", "-p", "-", "-o", str(out), "--hooks", "beta", "-q"],
                      input="first prompt\nsecond prompt\n"))
    group = zarr.open_group(str(out), mode="r")
    assert list(group["prompt_id"][:]) == ["0", "1"]
    assert group.attrs["gdn_dump"]["prompts"]["path"] == "<stdin>"


def test_inspect_of_a_non_store_is_one_line(runner, tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 2 and "no such store" in result.stderr


def test_shipped_configs_use_only_extract_options():
    import tomllib
    from pathlib import Path

    import typer.main

    command = typer.main.get_command(app).commands["extract"]
    names = {p.name for p in command.params}
    configs = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))
    assert len(configs) >= 4
    for path in configs:
        for key in tomllib.loads(path.read_text()):
            assert key.replace("-", "_") in names, (path.name, key)


def test_verify_and_finalize_commands(tiny, ragged_txt, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from gdn_dump.cli.app import app
    from gdn_dump.run.options import ExtractOptions
    from gdn_dump.run.pipeline import extract

    out = tmp_path / "s.zarr"
    extract(ExtractOptions(model="tiny", prompts=str(ragged_txt), out=str(out), hooks="q,beta"), model=tiny)
    runner = CliRunner()
    good = runner.invoke(app, ["verify", str(out)])
    assert good.exit_code == 0, good.output
    assert runner.invoke(app, ["finalize", str(out)]).exit_code == 0  # idempotent on a complete store
    shutil.rmtree(out / "blocks.1.linear_attn.hook_q" / "c")
    bad = runner.invoke(app, ["verify", str(out)])
    assert bad.exit_code == 1 and "rows written" in bad.output
    missing = runner.invoke(app, ["verify", str(tmp_path / "nope.zarr")])
    assert missing.exit_code == 2 and "no such store" in missing.output
