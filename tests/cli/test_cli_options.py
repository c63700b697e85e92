"""The command line's own machinery: options declared once, choices and sizes checked while
parsing, help at 80 columns, one place for errors (CliRunner and the console script), --quiet
silencing the libraries' bars, and the base install without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import zarr
import typer.main
from typer.testing import CliRunner

from gdn_dump.catalogue import MATRIX_METHODS, MATRIX_MODES
from gdn_dump.cli import app as app_module
from gdn_dump.cli.app import app
from gdn_dump.cli.options import SIZE_UNITS, parse_size
from gdn_dump.dtypes import MODEL_DTYPES, PRECISIONS, STORAGE_DTYPES
from gdn_dump.errors import GdnDumpError, Terminated
from gdn_dump.model.kernels import KERNEL_CHOICES
from gdn_dump.read.figures import KINDS
from gdn_dump.run.prompts import ENCODING_ERRORS
from gdn_dump.run.tokens import ON_LONG
from gdn_dump.store.create import COMPRESSORS
from gdn_dump.store.writer import WRITERS

COMMANDS = typer.main.get_command(app).commands


def run(*args, **kw):
    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def one_line(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    err = result.stderr
    assert err.startswith("gdn-dump: error: ") and err.strip().count("\n") == 0, err
    assert "Traceback" not in err + result.stdout
    return err


# --- one declaration per option ------------------------------------------------------------------

def _params(command: str) -> dict:
    return {p.name: p for p in COMMANDS[command].params}


def _same(a, b) -> None:
    for attr in ("opts", "secondary_opts", "help", "metavar", "rich_help_panel", "is_flag",
                 "show_default", "required", "is_eager"):
        assert getattr(a, attr) == getattr(b, attr), (a.name, attr)
    assert (a.callback is None) == (b.callback is None), a.name


def test_extract_and_attn_matrix_share_their_options():
    extract, matrix = _params("extract"), _params("attn-matrix")
    shared = set(extract) & set(matrix)
    assert len(shared) >= 25
    for name in shared:
        _same(extract[name], matrix[name])
    for ours, theirs in (("attn_heads", "heads"), ("attn_mode", "mode"), ("attn_method", "method"),
                         ("attn_precision", "precision")):
        _same(extract[ours], matrix[theirs])
    hooks = _params("hooks")
    for name in ("model", "revision", "trust_remote_code", "debug"):
        _same(hooks[name], extract[name])
    # per-command defaults live in the signatures
    assert extract["batch_size"].default == 8 and matrix["batch_size"].default == 1


@pytest.mark.parametrize("option, choices", [
    ("dtype", STORAGE_DTYPES), ("model_dtype", ("auto", *MODEL_DTYPES)), ("kernels", KERNEL_CHOICES),
    ("compressor", COMPRESSORS), ("writer", WRITERS), ("attn_mode", MATRIX_MODES),
    ("attn_method", MATRIX_METHODS), ("attn_precision", PRECISIONS), ("on_long", ON_LONG),
    ("encoding_errors", ENCODING_ERRORS)])
def test_choices_come_from_the_library_lists(option, choices):
    assert _params("extract")[option].metavar == "|".join(choices)


def test_plot_kinds_come_from_figures():
    assert _params("plot")["kind"].metavar == "|".join(KINDS)


def test_option_names_and_short_flags_are_kept():
    """The names the README's tables document, including short flags and the --no- forms."""
    names = {n for p in COMMANDS["extract"].params for n in (*p.opts, *p.secondary_opts)}
    for name in ("--model", "-m", "--prompts", "-p", "--out", "-o", "--quiet", "-q", "--stats",
                 "--no-stats", "--heads", "--mode", "--method", "--precision", "--max-bytes",
                 "--attn-layers", "--sort-window", "--resume", "--no-resume", "--config", "--debug",
                 "--model-dtype", "--trust-remote-code", "--allow-pickle-weights", "--max-batch-tokens"):
        assert name in names, name
    assert {"--layer", "--layers", "--png", "--png-log", "--png-max-prompts"} <= {
        n for p in COMMANDS["attn-matrix"].params for n in p.opts}
    assert {"--kind", "-k", "--out", "-o", "--dpi"} <= {n for p in COMMANDS["plot"].params for n in p.opts}


# --- choices are checked while parsing ------------------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    (["--dtype", "float8"], "--dtype must be one of float32, float16, bfloat16, not 'float8'"),
    (["--model-dtype", "half"], "--model-dtype must be one of auto, float32, float16, bfloat16, not 'half'"),
    (["--on-long", "drop"], "--on-long must be one of truncate, skip, error, not 'drop'"),
    (["--encoding-errors", "ignore"], "--encoding-errors must be one of strict, replace, not 'ignore'"),
    (["--writer", "foo"], "--writer must be one of zarr, tensorstore, not 'foo'"),
])
def test_a_bad_choice_is_refused_before_anything_is_read(tmp_path, extra, needle):
    """The prompt file does not exist: the choice is refused first, while parsing."""
    err = one_line(run("extract", "-m", "tiny", "-p", tmp_path / "missing.txt", "-o", tmp_path / "o.zarr",
                       *extra))
    assert needle in err and "see gdn-dump extract --help" in err
    assert not (tmp_path / "o.zarr").exists()


def test_a_bad_choice_in_a_config_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('model = "tiny"\ncompressor = "lzma"\n')
    err = one_line(run("extract", "--config", config, "-p", tmp_path / "missing.txt", "-o", tmp_path / "o.zarr"))
    assert "--compressor must be one of none, zstd, blosc, not 'lzma'" in err


def test_plot_kind_is_checked_while_parsing(tmp_path):
    err = one_line(run("plot", tmp_path / "missing.zarr", "--kind", "histogram", "-o", tmp_path / "f.png"))
    assert "--kind 'histogram' is unknown: one of decay, beta, attn, norms" in err  # before "no such store"


# --- sizes -----------------------------------------------------------------------------------------

GiB, MiB = 2**30, 2**20


@pytest.mark.parametrize("text, expected", [
    ("16GiB", 16 * GiB), ("512MiB", 512 * MiB), ("1GB", 10**9), ("1.5GiB", 3 * GiB // 2),
    ("16 GiB", 16 * GiB), ("16gib", 16 * GiB), ("1000000", 10**6), ("0", 0), ("1kB", 1000),
    ("1KB", 1000), ("2MB", 2 * 10**6), ("1TB", 10**12), ("1KiB", 1024), ("3TiB", 3 * 2**40),
    ("1K", 1024), ("2M", 2 * MiB), ("1G", GiB), ("1T", 2**40), ("1g", GiB), ("100B", 100),
    ("0.5KiB", 512), (".5KB", 500), ("1e9", 10**9), (" 7 ", 7), (1000, 1000), (2.0, 2),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, needle", [
    ("-1GiB", "must not be negative"), ("-5", "must not be negative"),
    ("nan", "must be a finite size"), ("inf", "must be a finite size"), ("-Infinity", "finite"),
    (float("inf"), "must be a finite size"),
    ("1.5", "is not a whole number of bytes"), ("0.3KiB", "is not a whole number of bytes"),
    (2.5, "is not a whole number of bytes"),
    ("16XB", "unknown unit 'XB'"), ("1 gigabyte", "unknown unit 'gigabyte'"),
    ("lots", "cannot read the size 'lots'"), ("", "cannot read the size"), ("GiB", "cannot read"),
    ("1/2", "cannot read"), (True, "cannot read"), ("1e400", "out of range"),
])
def test_bad_sizes(text, needle):
    with pytest.raises(ValueError, match="^--x") as info:
        parse_size(text, "--x")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_every_unit_is_in_the_help():
    help_text = run("extract", "--help", terminal_width=80).stdout
    flat = " ".join(help_text.split())
    for unit in ("KiB", "MiB", "GiB", "TiB", "kB", "MB", "GB", "TB"):
        assert unit in flat, unit
    assert {u.lower() for u in ("KiB", "MiB", "GiB", "TiB", "kB", "MB", "GB", "TB", "K", "M", "G", "T")} \
        <= set(SIZE_UNITS)
    assert "powers of 1024" in flat and "powers of 1000" in flat


@pytest.mark.parametrize("command, option", [("extract", "--sort-window"), ("extract", "--max-bytes"),
                                             ("attn-matrix", "--max-bytes")])
def test_a_bad_size_is_one_line_at_parse_time(tmp_path, command, option):
    err = one_line(run(command, "-m", "tiny", "-p", tmp_path / "missing.txt", "-o", tmp_path / "o.zarr",
                       option, "-2GiB"))
    assert f"{option} must not be negative, not '-2GiB'" in err


def test_a_size_from_a_config_file(tmp_path, ragged_txt):
    """A TOML integer is a size too; it reaches the run (the budget error names it)."""
    config = tmp_path / "run.toml"
    config.write_text("max-bytes = 1000\nsort-window = \"16 MiB\"\n")
    err = one_line(run("attn-matrix", "--config", config, "-m", "tiny", "-p", ragged_txt, "-o",
                       tmp_path / "o.zarr", "--layer", "0"))
    assert "--max-bytes 1000 B" in err


@pytest.mark.parametrize("value", ['"{a}"', '["{a}", "{b}"]'], ids=["one-path", "a-list"])
def test_prompts_from_a_config_file(tmp_path, value):
    """``prompts`` in TOML: one path or a list of them (one stream), and a count with a unit."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("hello world\n")
    b.write_text("another prompt\n")
    config = tmp_path / "run.toml"
    config.write_text(f"prompts = {value.format(a=a, b=b)}\nmax-tokens = \"1k\"\nhooks = \"beta\"\n")
    result = run("extract", "--config", config, "-m", "tiny", "-o", tmp_path / "o.zarr", "-q")
    assert result.exit_code == 0, result.stderr
    expected = ["0"] if value.startswith('"') else ["0", "1"]
    assert list(zarr.open_group(str(tmp_path / "o.zarr"))["prompt_id"][:]) == expected


# --- help at 80 columns ----------------------------------------------------------------------------

PANELS = {
    "extract": ["Model", "Prompts", "Hooks and layers", "Attention matrices", "Store",
                "Batching and speed", "Many processes", "Run control"],
    "attn-matrix": ["Model", "Prompts", "Attention matrices", "Store", "Batching and speed",
                    "Many processes", "Run control"],
    "hooks": ["Model", "Run control"],
    "plot": ["Arguments", "Figure", "Image", "Run control"],
    "inspect": ["Arguments", "Run control"],
    "verify": ["Arguments", "Run control"],
    "finalize": ["Arguments", "Run control"],
    "export": ["Arguments", "Export", "Run control"],
    None: ["Options", "Commands"],
}


@pytest.mark.parametrize("command", list(PANELS), ids=lambda c: c or "gdn-dump")
def test_help_reads_well_at_80_columns(command):
    args = [command, "--help"] if command else ["--help"]
    result = run(*args, terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    titles = [line.split("─ ", 1)[1].split(" ─", 1)[0] for line in lines if line.startswith("╭─ ")]
    assert titles == PANELS[command]
    # the help column: where every continuation line inside a panel starts; at least half the width
    inside = [line[1:-1] for line in lines if line.startswith("│")]
    starts = {len(row) - len(row.lstrip()) for row in inside if row.startswith("  ")}
    assert len(starts) == 1, starts
    column = 1 + starts.pop()
    assert 80 - column - 2 >= 40, column
    # every option is shown, under its own name, with its metavar
    shown = " ".join(inside)
    group = typer.main.get_command(app)
    for param in (group.commands[command] if command else group).params:
        for name in (param.opts if param.param_type_name == "option" else [param.metavar]):
            assert name in shown, name
        if param.param_type_name == "option" and not param.is_flag:
            assert f"{param.opts[-1]} {param.metavar}" in shown, param.name


def test_help_names_the_choices_and_defaults():
    flat = " ".join(run("extract", "--help", terminal_width=80).stdout.split())
    assert "--dtype float32|float16|bfloat16" in flat and "[default: float16]" in flat
    assert "--batch-size N" in flat and "[default: 8]" in flat
    assert "--stats / --no-stats" in flat and "--model, -m MODEL" in flat and "[required]" in flat
    assert "--no-resume" in flat  # said once, in the epilog
    assert "[default: 1]" in " ".join(run("attn-matrix", "--help", terminal_width=80).stdout.split())


# --- one place for errors -----------------------------------------------------------------------------

def test_an_unexpected_error_is_one_line_exit_1(tmp_path, monkeypatch):
    import gdn_dump.store.create as create

    def boom(*a, **k):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(create, "open_group", boom)
    err = one_line(run("inspect", tmp_path / "s.zarr"), code=1)
    assert "RuntimeError: something broke (rerun with --debug for the traceback)" in err
    result = run("inspect", tmp_path / "s.zarr", "--debug")
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


@pytest.mark.parametrize("order", ["debug-first", "debug-last"])
def test_a_config_error_honours_debug_in_either_order(tmp_path, order):
    bad = tmp_path / "bad.toml"
    bad.write_text('modle = "tiny"\n')
    args = ["extract", "--config", bad, "-p", tmp_path / "p.txt", "-o", tmp_path / "o.zarr"]
    one_line(run(*args))
    debug = ["extract", "--debug", *args[1:]] if order == "debug-first" else [*args, "--debug"]
    result = run(*debug)
    assert isinstance(result.exception, GdnDumpError) and "modle" in str(result.exception)
    unreadable = tmp_path / "unreadable.toml"
    unreadable.write_text("model = \n")
    assert "cannot read it" in one_line(run("extract", "--config", unreadable, "-o", "x", "-p", "y"))
    result = run("extract", "--config", unreadable, "-o", "x", "-p", "y", "--debug")
    assert isinstance(result.exception, GdnDumpError)


def test_a_debug_value_in_the_config_file_counts(tmp_path, monkeypatch):
    import gdn_dump.run.pipeline as pipeline

    def boom(opts):
        raise RuntimeError("from the library")

    monkeypatch.setattr(pipeline, "resolve", boom)
    config = tmp_path / "run.toml"
    config.write_text('model = "tiny"\ndebug = true\n')
    result = run("extract", "--config", config, "-p", "p.txt", "-o", tmp_path / "o.zarr")
    assert isinstance(result.exception, RuntimeError)


@pytest.mark.parametrize("exc, code, what", [(KeyboardInterrupt(), 130, "interrupted"),
                                             (Terminated(), 143, "terminated")])
def test_an_interrupt_says_what_was_left(tmp_path, ragged_txt, monkeypatch, exc, code, what):
    import gdn_dump.run.pipeline as pipeline

    def interrupted(opts, reporter=None):
        raise exc

    monkeypatch.setattr(pipeline, "extract", interrupted)
    result = run("extract", "-m", "tiny", "-p", ragged_txt, "-o", tmp_path / "o.zarr", "-q", "--debug")
    assert result.exit_code == code
    assert result.stderr == f"gdn-dump: {what} before the store was created; nothing was written\n"


@pytest.mark.parametrize("exc, code, what", [(KeyboardInterrupt(), 130, "interrupted"),
                                             (Terminated(), 143, "terminated")])
def test_an_interrupt_after_the_store_exists_says_resume(tmp_path, ragged_txt, monkeypatch, exc,
                                                         code, what):
    """The library tells the reporter when the store exists; the message follows it."""
    import gdn_dump.run.pipeline as pipeline

    def interrupted_run(*args, **kwargs):
        raise exc

    monkeypatch.setattr(pipeline, "run_region", interrupted_run)
    out = tmp_path / "o.zarr"
    result = run("extract", "-m", "tiny", "-p", ragged_txt, "-o", out, "-q")
    assert result.exit_code == code
    assert result.stderr == (f"gdn-dump: {what}; what was captured is written and {out} stays "
                             "in_progress: rerun with --resume to continue\n")


def test_the_console_script_main(tmp_path, monkeypatch, capsys):
    """main() is what ``gdn-dump`` runs: the same one line and exit code as through CliRunner."""
    for argv, code, needle in (
        (["inspect", str(tmp_path / "missing.zarr")], 2, "no such store"),
        (["extract", "-m", "tiny", "-p", "x", "-o", "y", "--dtype", "f8"], 2, "--dtype must be one of"),
        (["nope"], 2, "No such command 'nope'; see gdn-dump --help"),
        (["extract", "--batch-size", "eight", "-m", "t", "-p", "x", "-o", "y"], 2,
         "Invalid value for '--batch-size'"),
    ):
        monkeypatch.setattr(sys, "argv", ["gdn-dump", *argv])
        with pytest.raises(SystemExit) as info:
            app_module.main()
        out, err = capsys.readouterr()
        assert info.value.code == code and out == "", (argv, out, err)
        assert err.startswith("gdn-dump: error: ") and err.count("\n") == 1 and needle in err, err
    monkeypatch.setattr(sys, "argv", ["gdn-dump"])
    with pytest.raises(SystemExit) as info:
        app_module.main()
    assert info.value.code == 0 and "Commands" in capsys.readouterr().out


def test_no_arguments_prints_the_help():
    result = run()
    assert result.exit_code == 0 and "Commands" in result.stdout and "extract" in result.stdout


# --- --quiet also silences the libraries ------------------------------------------------------------

def test_quiet_silences_the_libraries_bars(tmp_path, ragged_txt):
    from transformers.utils import logging as hf_logging

    from ..helpers import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
    args = ["extract", "-m", checkpoint, "-p", ragged_txt, "--hooks", "beta", "--layers", "0"]
    loud = run(*args, "-o", tmp_path / "loud.zarr")
    assert loud.exit_code == 0, loud.stderr
    assert "Loading weights" in loud.stderr  # the bar the test is about (so it means something)
    quiet = run(*args, "-o", tmp_path / "quiet.zarr", "--quiet")
    assert quiet.exit_code == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == ""
    assert hf_logging.is_progress_bar_enabled()  # as it was, after the run


# --- the base install: no torch ------------------------------------------------------------------

NO_TORCH = textwrap.dedent("""
    import contextlib, importlib.abc, io, json, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("torch", "transformer_lens"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoTorch())
    from gdn_dump.cli.app import main

    results = []
    for argv in json.loads(sys.argv[1]):
        sys.argv = ["gdn-dump", *argv]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code
        results.append([code, out.getvalue(), err.getvalue()])
    results.append(sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "transformer_lens")))
    print(json.dumps(results))
""")


def test_without_torch_models_fail_in_one_line_and_stores_still_read(tmp_path, tiny, ragged_txt):
    from gdn_dump.run.options import ExtractOptions
    from gdn_dump.run.pipeline import extract

    store = tmp_path / "s.zarr"
    extract(ExtractOptions(model="tiny", prompts=str(ragged_txt), out=str(store), hooks="beta,log_decay"),
            model=tiny)
    commands = [["extract", "-m", "tiny", "-p", str(ragged_txt), "-o", str(tmp_path / "n.zarr")],
                ["attn-matrix", "-m", "tiny", "-p", str(ragged_txt), "-o", str(tmp_path / "n.zarr")],
                ["contributions", "-m", "tiny", "-p", str(ragged_txt), "-o", str(tmp_path / "n.zarr")],
                ["hooks", "-m", "tiny"],
                ["inspect", str(store)], ["verify", str(store)], ["finalize", str(store)],
                ["plot", str(store), "--kind", "decay", "-o", str(tmp_path / "d.png")]]
    done = subprocess.run([sys.executable, "-c", NO_TORCH, json.dumps(commands)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    *results, imported = json.loads(done.stdout.splitlines()[-1])
    assert imported == []
    models = ("extract", "attn-matrix", "contributions", "hooks")
    for name, (code, out, err) in zip(models, results[:len(models)]):
        assert (code, out) == (2, ""), (name, code, out, err)
        assert err == (f"gdn-dump: error: gdn-dump {name} needs torch and TransformerLens: "
                       "pip install 'gdn-dump[extract]'\n")
    for argv, (code, out, err) in zip(commands[len(models):], results[len(models):]):
        assert code == 0, (argv, out, err)
    inspected, finalized = results[len(models)][1], results[len(models) + 2][1]
    assert "status: complete" in inspected and "complete" in finalized
    assert (tmp_path / "d.png").stat().st_size > 0 and not (tmp_path / "n.zarr").exists()


def test_importing_the_cli_imports_no_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, gdn_dump.cli.app; "
                           "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                           "('torch', 'transformer_lens', 'transformers')))"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
