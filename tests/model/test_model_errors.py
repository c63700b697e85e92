"""Every mistake with ``--model`` ends as one line naming what was tried, with the right exit code.

No test touches the network: the Hugging Face cache lives under ``tmp_path``, the hub endpoint is a
closed local port, and where a hub answer matters, huggingface_hub's metadata call is replaced by
one that raises what the real one raises (so transformers' own re-wrapping of it is exercised).
"""

from __future__ import annotations

import errno
import json

import pytest
import torch

from gdn_dump.errors import GdnDumpError, RunFailure
from gdn_dump.model.load import load_config, load_model, load_tokenizer
from gdn_dump.model.tiny import build_tiny_model

from ..helpers import save_tiny_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache under tmp_path, online mode, and a hub nobody can reach."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads these once, at import: the environment alone would not reach it.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # safety net: refused locally
    return cache


@pytest.fixture()
def offline(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def hub_raises(monkeypatch, exc: BaseException) -> None:
    """The hub's HEAD request for any file raises ``exc`` (as huggingface_hub's own call would)."""
    import huggingface_hub.file_download as file_download

    def head(*args, **kwargs):
        raise exc

    monkeypatch.setattr(file_download, "get_hf_file_metadata", head)


def http_error(cls, status: int):
    import httpx2

    url = "http://127.0.0.1:9/org/name/resolve/main/config.json"
    response = httpx2.Response(status, request=httpx2.Request("HEAD", url))
    return cls(f"{status} Client Error for url: {url}", response=response)


def cli(*args: str):
    from typer.testing import CliRunner

    from gdn_dump.cli.app import app

    return CliRunner().invoke(app, list(args))


def extract(model: str, tmp_path, *extra: str):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nanother prompt\n")
    return cli("extract", "-m", model, "-p", str(prompts), "-o", str(tmp_path / "s.zarr"),
               "--hooks", "beta", "--device", "cpu", "-q", *extra)


def assert_one_line_failure(result, code: int, tmp_path) -> str:
    assert result.exit_code == code, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert not (tmp_path / "s.zarr").exists()
    return result.stderr


def pickle_checkpoint(path):
    """config + tokenizer + pytorch_model.bin only (save_pretrained always writes safetensors now)."""
    model, tokenizer = build_tiny_model()
    model.config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def remote_code_checkpoint(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "custom_gdn",
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomModel"},
    }))
    return path


# ---- local paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["./nope", "ABS", "~/gdn-dump-no-such-dir-7f3a", "models/x/y", "../nope/"])
def test_a_missing_local_path_is_refused_without_asking_the_hub(form, tmp_path, monkeypatch, hub):
    name = str(tmp_path / "nope") if form == "ABS" else form
    monkeypatch.chdir(tmp_path)
    hub_raises(monkeypatch, AssertionError("the hub was asked about a local path"))
    for load in (load_config, load_tokenizer, lambda n: load_model(n, device="cpu")):
        with pytest.raises(GdnDumpError, match=r"^--model .*: no such directory \(/") as info:
            load(name)
        assert info.value.exit_code == 2 and str(info.value).startswith(f"--model {name}:")


def test_org_name_that_is_no_directory_and_no_repository(tmp_path, monkeypatch, hub):
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.chdir(tmp_path)
    hub_raises(monkeypatch, http_error(RepositoryNotFoundError, 404))
    with pytest.raises(GdnDumpError, match=r"--model models/x: no such directory \(.*/models/x\), "
                                           r"and no such repository on the Hugging Face hub") as info:
        load_config("models/x")
    assert info.value.exit_code == 2


def test_an_existing_directory_is_local_even_when_it_looks_like_a_hub_id(tmp_path, monkeypatch, hub):
    save_tiny_checkpoint(tmp_path / "org" / "name", multimodal=False)
    monkeypatch.chdir(tmp_path)
    hub_raises(monkeypatch, AssertionError("the hub was asked about a local directory"))
    assert load_config("org/name").model_type == "qwen3_5_text"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_tokenizer("~/org/name")("hello")["input_ids"]


def test_a_directory_without_config_json_says_what_it_holds(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(GdnDumpError, match=r"is not a checkpoint \(no config.json; it holds notes.txt\)"):
        load_config(str(tmp_path / "ckpt"))


def test_a_file_is_not_a_checkpoint_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GdnDumpError, match=r"is a file; give the checkpoint directory"):
        load_config(str(tmp_path / "config.json"))


def test_a_hybrid_type_without_gdn_layers_lists_the_layer_types(tmp_path):
    from transformers import Qwen3_5TextConfig

    Qwen3_5TextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=16, intermediate_size=64, vocab_size=50,
                      layer_types=["full_attention"] * 2).save_pretrained(tmp_path)
    with pytest.raises(GdnDumpError, match=r"no Gated DeltaNet .* \(its layer types: 2 full_attention\)"):
        load_config(str(tmp_path))


def test_an_unreadable_config_is_one_line_naming_the_model(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GdnDumpError, match=r"^--model .*: could not load its config \(It looks like") as info:
        load_config(str(tmp_path))
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_a_checkpoint_without_tokenizer_files_is_refused(tmp_path):
    model, _ = build_tiny_model()
    model.save_pretrained(tmp_path)  # no tokenizer: transformers would build an empty one
    with pytest.raises(GdnDumpError, match=r"it has no tokenizer"):
        load_tokenizer(str(tmp_path))


def test_cli_missing_directory_and_directory_without_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stderr = assert_one_line_failure(extract("./nope", tmp_path), 2, tmp_path)
    assert "--model ./nope: no such directory" in stderr
    (tmp_path / "empty").mkdir()
    stderr = assert_one_line_failure(extract(str(tmp_path / "empty"), tmp_path), 2, tmp_path)
    assert "is not a checkpoint (no config.json; it holds nothing)" in stderr


# ---- the hub ----------------------------------------------------------------------------------------

def _network_failures():
    import httpx2

    return [httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"),
            httpx2.ConnectTimeout("timed out")]


@pytest.mark.parametrize("exc", _network_failures(), ids=["connect", "timeout"])
def test_an_unreachable_hub_is_a_run_failure_with_the_offline_hint(exc, monkeypatch, hub):
    hub_raises(monkeypatch, exc)
    with pytest.raises(RunFailure, match=r"^--model org/name: could not reach the Hugging Face hub for its "
                                         r"config \(.*\); .*set HF_HUB_OFFLINE=1 to use a cached copy$"):
        load_config("org/name")


def test_hub_server_errors_are_run_failures(monkeypatch, hub):
    from huggingface_hub.errors import HfHubHTTPError

    hub_raises(monkeypatch, http_error(HfHubHTTPError, 503))
    with pytest.raises(RunFailure, match="could not reach the Hugging Face hub"):
        load_config("org/name")


def _wrapped_by_transformers():
    import httpx2

    exc = OSError("There was a specific connection error when trying to load org/name")
    exc.__cause__ = httpx2.ReadTimeout("read timed out")  # transformers: `raise OSError(...) from e`
    return exc


@pytest.mark.parametrize("make", [
    lambda: __import__("requests").exceptions.ConnectionError("Max retries exceeded"),
    lambda: __import__("httpx").ConnectError("All connection attempts failed"),
    _wrapped_by_transformers,
], ids=["requests", "httpx", "wrapped-by-transformers"])
def test_network_errors_of_any_http_client_are_run_failures(make, monkeypatch, hub):
    from transformers import AutoConfig

    exc = make()

    def from_pretrained(*args, **kwargs):
        raise exc

    monkeypatch.setattr(AutoConfig, "from_pretrained", from_pretrained)
    with pytest.raises(RunFailure, match="HF_HUB_OFFLINE=1"):
        load_config("org/name")


@pytest.mark.parametrize("cls, status, message", [
    ("RepositoryNotFoundError", 404, r"no such repository on the Hugging Face hub"),
    ("GatedRepoError", 403, r"is a gated repository: accept its terms"),
    ("RevisionNotFoundError", 404, r"the Hugging Face hub has no revision 'v9' of it"),
    ("HfHubHTTPError", 401, r"the Hugging Face hub refused access"),
])
def test_hub_answers_about_a_bad_id_are_usage_errors(cls, status, message, monkeypatch, hub):
    import huggingface_hub.errors as hf

    hub_raises(monkeypatch, http_error(getattr(hf, cls), status))
    with pytest.raises(GdnDumpError, match=message) as info:
        load_config("org/name", revision="v9")
    assert info.value.exit_code == 2 and not isinstance(info.value, RunFailure)


def test_offline_and_not_cached_is_a_usage_error(offline):
    with pytest.raises(GdnDumpError, match=r"its config is not in the Hugging Face cache \(.*\) while "
                                           r"HF_HUB_OFFLINE=1 forbids downloading it") as info:
        load_config("org/name")
    assert info.value.exit_code == 2


def test_cli_unreachable_hub_exits_1(tmp_path, monkeypatch, hub):
    import httpx2

    hub_raises(monkeypatch, httpx2.ConnectError("[Errno 101] Network is unreachable"))
    stderr = assert_one_line_failure(extract("org/name", tmp_path), 1, tmp_path)
    assert "could not reach the Hugging Face hub" in stderr and "HF_HUB_OFFLINE=1" in stderr


def test_a_cached_hub_model_loads_offline(offline, monkeypatch):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = offline / "models--org--name"
    snapshot = save_tiny_checkpoint(repo / "snapshots" / COMMIT, multimodal=False)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    hub_raises(monkeypatch, AssertionError("offline, yet the hub was asked"))

    assert load_config("org/name").layer_types == load_config(str(snapshot)).layer_types
    assert load_tokenizer("org/name")("hello")["input_ids"]
    loaded = load_model("org/name", device="cpu")
    expected, _ = build_tiny_model()
    assert loaded.name == "org/name"
    torch.testing.assert_close(loaded.hf_model.lm_head.weight, expected.lm_head.weight)
    with pytest.raises(GdnDumpError, match="not in the Hugging Face cache"):
        load_config("org/name", revision="v2")  # a revision the cache does not hold


# ---- weights and code ------------------------------------------------------------------------------

def test_pickle_weights_need_allow_pickle_weights(tmp_path):
    ckpt = pickle_checkpoint(tmp_path / "ckpt")
    with pytest.raises(GdnDumpError, match=r"^--model .*ckpt has only pickle weights \(pytorch_model.bin\); "
                                           r"pass --allow-pickle-weights if you trust it$") as info:
        load_model(str(ckpt), device="cpu")
    assert info.value.exit_code == 2
    loaded = load_model(str(ckpt), device="cpu", allow_pickle_weights=True)
    expected, _ = build_tiny_model()
    torch.testing.assert_close(loaded.hf_model.lm_head.weight, expected.lm_head.weight)


def test_a_checkpoint_without_weights_says_so(tmp_path):
    ckpt = pickle_checkpoint(tmp_path / "ckpt")
    (ckpt / "pytorch_model.bin").unlink()
    with pytest.raises(GdnDumpError, match=r"no weights in .*ckpt \(neither model.safetensors nor"):
        load_model(str(ckpt), device="cpu")


def test_cli_pickle_weights_exit_2_and_load_with_the_flag(tmp_path):
    ckpt = pickle_checkpoint(tmp_path / "ckpt")
    stderr = assert_one_line_failure(extract(str(ckpt), tmp_path), 2, tmp_path)
    assert "has only pickle weights (pytorch_model.bin); pass --allow-pickle-weights" in stderr
    result = extract(str(ckpt), tmp_path, "--allow-pickle-weights")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "s.zarr").exists()


def test_remote_code_needs_trust_remote_code(tmp_path):
    ckpt = remote_code_checkpoint(tmp_path / "ckpt")
    with pytest.raises(GdnDumpError, match=r"its config needs the checkpoint's own Python code \(auto_map\); "
                                           r"pass --trust-remote-code if you trust it") as info:
        load_config(str(ckpt))
    assert info.value.exit_code == 2


def test_cli_remote_code_exit_2_in_extract_and_hooks(tmp_path):
    ckpt = remote_code_checkpoint(tmp_path / "ckpt")
    stderr = assert_one_line_failure(extract(str(ckpt), tmp_path), 2, tmp_path)
    assert "pass --trust-remote-code" in stderr
    result = cli("hooks", "-m", str(ckpt))
    assert result.exit_code == 2 and "pass --trust-remote-code" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_machine_side_os_errors_are_run_failures(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", multimodal=False)

    def from_pretrained(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(RunFailure, match=r"could not load its weights: \[Errno 28\] No space left"):
        load_model(str(ckpt), device="cpu")


def test_a_corrupt_safetensors_file_is_one_line(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", multimodal=False)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(GdnDumpError, match=r"could not load its weights \(") as info:
        load_model(str(ckpt), device="cpu")
    assert "\n" not in str(info.value)
