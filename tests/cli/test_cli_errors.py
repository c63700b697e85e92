"""Every user mistake ends as ONE line on stderr, the right exit code, and nothing written.

CLI-level (typer's CliRunner, in-process). Each case checks: the exit code (2 for usage errors),
exactly one stderr line starting ``gdn-dump: error:``, no traceback, that the line names what is
wrong (file, line number, field, option), and that nothing was created at ``--out`` (or that an
existing store is byte-for-byte untouched). ``--debug`` re-raises the tool's own error instead.
docs/errors.md is the user-facing table of these messages.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import zarr
from typer.testing import CliRunner

from gdn_dump.cli.app import app
from gdn_dump.errors import GdnDumpError, PromptFileError, SelectionError, StoreError

PROMPTS = b"hello world\nthe quick brown fox\n"
DIRECTORY = object()  # "make a directory here" in the prompt-file cases


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(result, *needles: str, code: int = 2) -> str:
    """Exit ``code``; stderr is one ``gdn-dump: error:`` line holding every needle; no traceback."""
    err = result.stderr
    assert result.exit_code == code, (result.exit_code, err, result.stdout, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    assert err.strip() and err.strip().count("\n") == 0, err
    assert err.startswith("gdn-dump: error: "), err
    assert "Traceback" not in err + result.stdout
    assert result.stdout == "", result.stdout
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture()
def good_txt(tmp_path):
    path = tmp_path / "good.txt"
    path.write_bytes(PROMPTS)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A complete store written by the CLI, and the prompt file it came from."""
    root = tmp_path_factory.mktemp("existing")
    prompts = root / "p.txt"
    prompts.write_bytes(PROMPTS)
    out = root / "s.zarr"
    result = run("extract", "-m", "tiny", "-p", prompts, "-o", out, "--hooks", "beta", "--layers", "0", "-q")
    assert result.exit_code == 0, result.stderr
    return out, prompts


# --- the prompt file -----------------------------------------------------------------------------

PROMPT_FILE_CASES = {
    # name: (file name, content, substrings the one line must hold)
    "missing": ("nope.txt", None, ["nope.txt", "no such file"]),
    "directory": ("adir", DIRECTORY, ["adir", "is a directory"]),
    "empty": ("empty.txt", b"", ["empty.txt", "the file is empty"]),
    "only-blank-lines": ("blank.txt", b"\n   \n\t\n", ["blank.txt", "no prompts", "3 line(s) are blank"]),
    "invalid-utf8": ("bad.txt", b"fine\nalso fine\nbad \xff byte\n",
                     ["bad.txt", "line 3", "invalid UTF-8", "0xff", "--encoding-errors replace"]),
    "jsonl-malformed": ("p.jsonl", b'{"text": "ok"}\n{"text": "no closing brace"\n',
                        ["p.jsonl", "line 2", "invalid JSON"]),
    "jsonl-not-an-object": ("p.jsonl", b'{"text": "ok"}\n["text", "x"]\n',
                            ["p.jsonl", "line 2", "expected a JSON object", "an array"]),
    "jsonl-missing-text": ("p.jsonl", b'{"text": "ok"}\n{"id": "b", "body": "x"}\n',
                           ["p.jsonl", "line 2", "missing field 'text'", "'body'"]),
    "jsonl-text-not-a-string": ("p.jsonl", b'{"text": 42}\n',
                                ["p.jsonl", "line 1", "field 'text' must be a string", "a number"]),
    "jsonl-empty-text": ("p.jsonl", b'{"text": "ok"}\n\n{"text": ""}\n',
                         ["p.jsonl", "line 3", "field 'text' is an empty string"]),
    "jsonl-bad-id": ("p.jsonl", b'{"id": [1], "text": "ok"}\n',
                     ["p.jsonl", "line 1", "field 'id' must be a string or an integer"]),
    "jsonl-duplicate-ids": ("p.jsonl", b'{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n'
                                       b'{"id": "a", "text": "z"}\n',
                            ["p.jsonl", "line 3", "duplicate id 'a'", "first used on line 1"]),
}


def _prompt_file(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    if content is DIRECTORY:
        path.mkdir()
        (path / "inside.txt").write_bytes(PROMPTS)
    elif content is not None:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("case", list(PROMPT_FILE_CASES))
def test_extract_prompt_file_errors(tmp_path, case):
    name, content, needles = PROMPT_FILE_CASES[case]
    prompts, out = _prompt_file(tmp_path, name, content), tmp_path / "out.zarr"
    before = files_of(tmp_path)
    result = run("extract", "-m", "tiny", "-p", prompts, "-o", out, "--hooks", "beta")
    assert_one_line_error(result, *needles)
    assert not out.exists()
    assert files_of(tmp_path) == before  # the prompt file untouched, no stray file


@pytest.mark.parametrize("case", ["empty", "jsonl-duplicate-ids"])
def test_attn_matrix_prompt_file_errors(tmp_path, case):
    name, content, needles = PROMPT_FILE_CASES[case]
    prompts, out = _prompt_file(tmp_path, name, content), tmp_path / "attn.zarr"
    result = run("attn-matrix", "-m", "tiny", "-p", prompts, "-o", out, "--layer", "0")
    assert_one_line_error(result, *needles)
    assert not out.exists()


@pytest.mark.parametrize("stdin, needles", [
    (b"", ["<stdin>", "the file is empty"]),
    (b"ok\n\xc3\x28 broken\n", ["<stdin>", "line 2", "invalid UTF-8", "0xc3"]),
], ids=["empty", "invalid-utf8"])
def test_stdin_prompt_errors(tmp_path, stdin, needles):
    out = tmp_path / "out.zarr"
    result = run("extract", "-m", "tiny", "-p", "-", "-o", out, "--hooks", "beta", input=stdin)
    assert_one_line_error(result, *needles)
    assert not out.exists()


def test_text_field_is_named(tmp_path):
    prompts = _prompt_file(tmp_path, "p.jsonl", b'{"text": "ok"}\n')
    result = run("extract", "-m", "tiny", "-p", prompts, "-o", tmp_path / "o.zarr", "--text-field", "body")
    assert_one_line_error(result, "line 1", "missing field 'body'", "'text'")


# --- hook and layer selection (tiny: layers 0-2 GDN, layer 3 softmax attention) -------------------

@pytest.mark.parametrize("extra, needles", [
    (["--hooks", "betta"], ["unknown hook 'betta'", "did you mean beta"]),
    (["--hooks", "recurence_out"], ["unknown hook 'recurence_out'", "did you mean recurrence_out"]),
    (["--hooks", "zzzz"], ["unknown hook 'zzzz'", "choose from", "gdn-dump hooks"]),
    (["--hooks", "blocks.3.attn.hook_patern"], ["unknown hook", "did you mean blocks.3.attn.hook_pattern"]),
    (["--hooks", "beta", "--layers", "9"], ["--layers", "layer 9 is out of range", "0-3"]),
    (["--hooks", "beta", "--layers", "1-x"], ["--layers", "cannot read '1-x'"]),
    (["--hooks", "beta", "--layers", "3"], ["layer 3 is a softmax-attention layer", "beta", "GDN layers 0,1,2"]),
    (["--hooks", "beta", "--layers", "0-3"], ["layer 3 is a softmax-attention layer"]),
    (["--hooks", ","], ["--hooks selects nothing"]),
    (["--hooks", "beta", "--layers", ","], ["--layers selects no layer"]),
    (["--attn-layers", "0", "--heads", "9"], ["--heads", "head 9 is out of range", "layer 0"]),
], ids=["unknown-short", "unknown-short-2", "unknown-no-match", "unknown-full-name", "layer-out-of-range",
        "layer-unreadable", "gdn-hook-on-attention-layer", "range-over-attention-layer", "empty-hooks",
        "empty-layers", "head-out-of-range"])
def test_selection_errors(tmp_path, good_txt, extra, needles):
    out = tmp_path / "out.zarr"
    result = run("extract", "-m", "tiny", "-p", good_txt, "-o", out, *extra)
    assert_one_line_error(result, *needles)
    assert not out.exists()


def test_attn_matrix_layer_out_of_range(tmp_path, good_txt):
    out = tmp_path / "attn.zarr"
    assert_one_line_error(run("attn-matrix", "-m", "tiny", "-p", good_txt, "-o", out, "--layer", "7"),
                          "layer 7 is out of range")
    assert not out.exists()


def test_attn_layers_error_names_attn_layers(tmp_path, good_txt):
    out = tmp_path / "out.zarr"
    assert_one_line_error(run("extract", "-m", "tiny", "-p", good_txt, "-o", out, "--attn-layers", "9"),
                          "--attn-layers", "layer 9")
    assert not out.exists()


# --- the output store ----------------------------------------------------------------------------

def test_existing_out_is_refused_and_untouched(store):
    out, prompts = store
    before = files_of(out)
    for args in (["extract", "-m", "tiny", "-p", prompts, "-o", out, "--hooks", "beta", "--layers", "0", "-q"],
                 ["extract", "-m", "tiny", "-p", prompts, "-o", out, "--hooks", "q"],
                 ["attn-matrix", "-m", "tiny", "-p", prompts, "-o", out, "--layer", "0"]):
        assert_one_line_error(run(*args), f"--out {out} already exists", "--overwrite")
        assert files_of(out) == before


def test_resume_with_other_settings_is_refused_and_untouched(store):
    out, prompts = store
    before = files_of(out)
    result = run("extract", "-m", "tiny", "-p", prompts, "-o", out, "--hooks", "q", "--layers", "0",
                 "--resume", "-q")
    assert_one_line_error(result, "--resume", "different settings", "hooks")
    assert files_of(out) == before


def test_out_is_an_existing_file(tmp_path, good_txt):
    out = tmp_path / "file.zarr"
    out.write_bytes(b"precious")
    assert_one_line_error(run("extract", "-m", "tiny", "-p", good_txt, "-o", out, "--overwrite"),
                          f"--out {out} is an existing file")
    assert out.read_bytes() == b"precious"


def test_attn_matrix_over_the_memory_budget(tmp_path, good_txt):
    out = tmp_path / "attn.zarr"
    result = run("attn-matrix", "-m", "tiny", "-p", good_txt, "-o", out, "--layer", "0,3", "--max-bytes", "1KB")
    err = assert_one_line_error(result, "the attention matrices need", "2 prompts", "--max-bytes", "1000 B")
    assert "KiB" in err.split("need")[1].split("(")[0]  # the estimate itself
    assert not out.exists()


# --- bad option values ---------------------------------------------------------------------------

BAD_OPTION_VALUES = [
    (["--batch-size", "0"], ["--batch-size must be at least 1", "not 0"]),
    (["--max-length", "0"], ["--max-length must be at least 1", "not 0"]),
    (["--max-batch-tokens", "0"], ["--max-batch-tokens must be at least 1"]),
    (["--chunk-tokens", "0"], ["--chunk-tokens must be at least 1"]),
    (["--dtype", "float8"], ["--dtype must be one of float32, float16, bfloat16", "'float8'"]),
    (["--model-dtype", "float8"], ["--model-dtype must be one of", "'float8'"]),
    (["--compressor", "lz5"], ["--compressor must be one of none, zstd, blosc", "'lz5'"]),
    (["--writer", "foo"], ["--writer must be one of", "'foo'"]),
    (["--device", "tpu"], ["--device must be auto, cpu or cuda[:N]", "'tpu'"]),
    (["--kernels", "cuda"], ["--kernels must be one of auto, torch, fla", "'cuda'"]),
    (["--shard", "3/2"], ["--shard 3/2", "0 <= I < N"]),
    (["--shard", "two/"], ["--shard takes I/N", "'two/'"]),
    (["--sort-window", "lots"], ["cannot read the size 'lots'"]),
    (["--max-bytes", "-"], ["cannot read the size '-'"]),
]


@pytest.mark.parametrize("extra, needles", BAD_OPTION_VALUES,
                         ids=[f"{opt.lstrip('-')}={value}" for (opt, value), _ in BAD_OPTION_VALUES])
def test_bad_option_values(tmp_path, good_txt, extra, needles):
    out = tmp_path / "out.zarr"
    result = run("extract", "-m", "tiny", "-p", good_txt, "-o", out, "--hooks", "beta", *extra)
    assert_one_line_error(result, *needles)
    assert not out.exists()


@pytest.mark.parametrize("extra, needles", [
    (["--batch-size", "0"], ["--batch-size must be at least 1"]),
    (["--shard", "3/2"], ["--shard 3/2"]),
    (["--max-bytes", "huge"], ["cannot read the size 'huge'"]),
], ids=["batch-size", "shard", "max-bytes"])
def test_attn_matrix_bad_option_values(tmp_path, good_txt, extra, needles):
    out = tmp_path / "attn.zarr"
    assert_one_line_error(run("attn-matrix", "-m", "tiny", "-p", good_txt, "-o", out, *extra), *needles)
    assert not out.exists()


ATTN_COMMANDS = {"extract": ["extract", "--hooks", "beta", "--attn-layers", "0"],
                 "attn-matrix": ["attn-matrix", "--layer", "0"]}


@pytest.mark.parametrize("command", list(ATTN_COMMANDS))
@pytest.mark.parametrize("extra, needle", [
    (["--mode", "fuzzy"], "--mode"),
    (["--method", "x"], "--method"),
    (["--precision", "float16"], "--precision"),
], ids=["mode", "method", "precision"])
def test_bad_attention_option_values(tmp_path, good_txt, command, extra, needle):
    first, *rest = ATTN_COMMANDS[command]
    out = tmp_path / "out.zarr"
    result = run(first, "-m", "tiny", "-p", good_txt, "-o", out, *rest, *extra, "-q")
    assert_one_line_error(result, needle, repr(extra[1]))
    assert not out.exists()


def test_click_parse_errors_exit_2_naming_the_option(tmp_path, good_txt):
    """Values click itself rejects (not a number, unknown option) exit 2 too, as one line."""
    out = tmp_path / "out.zarr"
    for extra, needle in ((["--batch-size", "eight"], "--batch-size"), (["--hookz", "beta"], "--hookz")):
        result = run("extract", "-m", "tiny", "-p", good_txt, "-o", out, *extra)
        assert_one_line_error(result, needle, "see gdn-dump extract --help")
        assert not out.exists()


# --- --debug re-raises the tool's own error ------------------------------------------------------

@pytest.mark.parametrize("extra, error", [
    (["--batch-size", "0"], GdnDumpError),
    (["--hooks", "betta"], SelectionError),
    (["-p", "MISSING"], PromptFileError),
], ids=["option", "selection", "prompt-file"])
def test_debug_reraises(tmp_path, good_txt, extra, error):
    extra = [tmp_path / "nope.txt" if a == "MISSING" else a for a in extra]
    out = tmp_path / "out.zarr"
    result = run("extract", "-m", "tiny", "-p", good_txt, "-o", out, *extra, "--debug")
    assert result.exit_code != 0
    assert isinstance(result.exception, error), repr(result.exception)
    assert not out.exists()


def test_debug_reraises_store_error(store):
    out, prompts = store
    before = files_of(out)
    result = run("extract", "-m", "tiny", "-p", prompts, "-o", out, "--debug")
    assert result.exit_code != 0 and isinstance(result.exception, StoreError), repr(result.exception)
    assert files_of(out) == before


# --- after the run: inspect, verify, finalize on something that is not a store --------------------

@pytest.mark.parametrize("command", ["inspect", "verify", "finalize"])
def test_not_a_store(tmp_path, command):
    missing = tmp_path / "missing.zarr"
    assert_one_line_error(run(command, missing), str(missing), "no such store")
    assert not missing.exists()
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w", zarr_format=3)
    before = files_of(plain)
    assert_one_line_error(run(command, plain), str(plain), "not a gdn-dump store")
    assert files_of(plain) == before


@pytest.mark.parametrize("extra, needle", [
    (["--batch-size", "eight"], "Invalid value for '--batch-size'"),
    (["--hookz", "beta"], "No such option: --hookz (Possible options: --hooks)"),
])
def test_the_entry_point_prints_click_usage_errors_as_one_line(tmp_path, good_txt, extra, needle):
    """``gdn-dump`` (cli.main) turns click's own usage errors into the tool's one line, exit 2."""
    import subprocess
    import sys

    out = tmp_path / "out.zarr"
    done = subprocess.run([sys.executable, "-m", "gdn_dump", "extract", "-m", "tiny", "-p", str(good_txt),
                           "-o", str(out), *extra], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("gdn-dump: error: ")
    assert needle in done.stderr and "see gdn-dump extract --help" in done.stderr
    assert not out.exists()


# --- corpora (Parquet, datasets, compressed, chat, token ids, packing, budgets) --------------------


def _parquet(path: Path, **columns) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def _corpus_case(tmp_path: Path, case: str):
    """(prompt argument, extra options, needles) of each corpus mistake."""
    import gzip
    import json

    if case == "parquet-missing-field":
        return _parquet(tmp_path / "a.parquet", body=["x", "y"]), [], ["a.parquet", "missing field 'text'", "'body'"]
    if case == "parquet-corrupt":
        (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
        return tmp_path / "bad.parquet", [], ["bad.parquet", "not a valid parquet file"]
    if case == "gzip-corrupt":
        (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:-12])
        return tmp_path / "p.jsonl.gz", [], ["p.jsonl.gz", "not a valid gz file"]
    if case == "empty-glob":
        return str(tmp_path / "web-*.parquet"), [], ["web-*.parquet", "no files match"]
    if case == "messages-not-a-list":
        (tmp_path / "c.jsonl").write_text(json.dumps({"messages": {"role": "user"}}) + "\n")
        return tmp_path / "c.jsonl", ["--chat"], ["c.jsonl", "line 1", "field 'messages' must be a list"]
    if case == "input-ids-not-a-list":
        return (_parquet(tmp_path / "t.parquet", input_ids=["1 2 3"]), ["--tokens-field", "input_ids"],
                ["t.parquet", "row 1", "field 'input_ids' must be a list of token ids"])
    if case == "token-id-outside-vocabulary":
        return (_parquet(tmp_path / "t.parquet", input_ids=[[1, 2], [3, 10**6]]), ["--tokens-field", "input_ids"],
                ["t.parquet", "row 2", "token id 1000000", "outside the model's vocabulary"])
    if case == "context-size-over-max-positions":
        return _parquet(tmp_path / "a.parquet", text=["x"]), ["--context-size", "300000"], [
            "--context-size 300000", "max_position_embeddings 262144"]
    if case == "budget-zero":
        return _parquet(tmp_path / "a.parquet", text=["x"]), ["--max-tokens", "0"], ["--max-tokens must be at least 1"]
    if case == "budget-unreadable":
        return _parquet(tmp_path / "a.parquet", text=["x"]), ["--max-tokens", "50Q"], ["--max-tokens", "50Q"]
    if case == "budget-below-one-context":
        return (_parquet(tmp_path / "a.parquet", text=["hello world"] * 50), ["--context-size", "64", "--max-tokens", "10"],
                ["--max-tokens 10 is less than one context"])
    if case == "corpus-shorter-than-a-context":
        return (_parquet(tmp_path / "a.parquet", text=["hi"]), ["--context-size", "64"],
                ["a.parquet", "less than one context of --context-size 64"])
    if case == "chat-and-tokens":
        return (_parquet(tmp_path / "a.parquet", text=["x"]), ["--chat", "--tokens-field", "ids"],
                ["--chat and --tokens-field exclude each other"])
    if case == "chat-on-txt":
        (tmp_path / "p.txt").write_text("hello\n")
        return tmp_path / "p.txt", ["--chat"], ["p.txt", "--chat needs records with fields"]
    raise AssertionError(case)


CORPUS_CASES = ["parquet-missing-field", "parquet-corrupt", "gzip-corrupt", "empty-glob",
                "messages-not-a-list", "input-ids-not-a-list", "token-id-outside-vocabulary",
                "context-size-over-max-positions", "budget-zero", "budget-unreadable",
                "budget-below-one-context", "corpus-shorter-than-a-context", "chat-and-tokens",
                "chat-on-txt"]


@pytest.mark.parametrize("case", CORPUS_CASES)
def test_corpus_errors(tmp_path, case):
    prompts, extra, needles = _corpus_case(tmp_path, case)
    out = tmp_path / "out.zarr"
    before = files_of(tmp_path)
    result = run("extract", "-m", "tiny", "-p", prompts, "-o", out, "--hooks", "beta", *extra)
    assert_one_line_error(result, *needles)
    assert not out.exists()
    assert files_of(tmp_path) == before


def test_a_process_whose_documents_cannot_fill_its_share_says_so(tmp_path):
    prompts = _parquet(tmp_path / "a.parquet", text=["a few words here"] * 8 + ["x"] * 8)
    out = tmp_path / "out.zarr"
    result = run("extract", "-m", "tiny", "-p", prompts, "-o", out, "--hooks", "beta",
                 "--context-size", "16", "--max-tokens", "160", "--shard", "1/2", "--sort-window", "0",
                 "--batch-size", "1")
    assert_one_line_error(result, "process 1's documents (8..15 of 16)", "lower --max-tokens")
    assert not out.exists()
