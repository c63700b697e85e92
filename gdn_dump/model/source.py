"""What ``--model`` names, and one line for each way loading it can fail.

transformers and huggingface_hub raise plain ``OSError``s, ``ValueError``s and client errors of the
HTTP library in use; users need to know which of their inputs is wrong (exit 2) or that the network
failed (exit 1, ``RunFailure``), and what to do. :func:`resolve_source` decides what transformers is
given; :func:`load_error` turns a failure into that one line.
"""

from __future__ import annotations

import errno
import importlib
import os
import socket
from pathlib import Path

from ..errors import GdnDumpError, RunFailure

_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# OSErrors of this machine, not of the checkpoint: a rerun elsewhere (or later) can succeed.
_RUNTIME_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EIO, errno.ENOMEM, errno.EDQUOT}


def resolve_source(name: str) -> str:
    """What transformers is given for ``--model name``: an existing directory (``~`` expanded), else a
    hub id. Refuses what can only be a local path yet is not a checkpoint directory."""
    if not name.strip():
        raise GdnDumpError("--model is empty: give tiny, a Hugging Face id or a checkpoint directory")
    path = Path(name).expanduser()
    if path.is_dir():  # an existing directory is always local, even if it looks like org/name
        if not (path / "config.json").is_file():
            raise GdnDumpError(f"--model {name}: {os.path.abspath(path)} is not a checkpoint "
                               f"(no config.json; it holds {_listing(path)})")
        return str(path)
    if path.exists():
        raise GdnDumpError(f"--model {name}: {os.path.abspath(path)} is a file; give the checkpoint "
                           "directory (the one holding config.json)")
    # Hub ids are `name` or `org/name`: anything else can only have meant a local directory.
    if name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name:
        raise GdnDumpError(f"--model {name}: no such directory ({os.path.abspath(path)})")
    return name


def _listing(path: Path, most: int = 6) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "nothing"
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def load_error(name: str, what: str, exc: BaseException, revision: str | None = None) -> GdnDumpError:
    """One line for what transformers / huggingface_hub raised while loading ``what`` of ``name``.

    transformers re-raises the hub's errors as plain ``OSError``s (``raise OSError(...) from e``), so
    the cause chain, not the outer type, tells a missing repository (exit 2) from a network failure
    (exit 1, ``RunFailure``).
    """
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    chain = _chain(exc)

    def found(*types):
        return next((e for e in chain if isinstance(e, types)), None)

    where = f"no such directory ({os.path.abspath(name)})"
    if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):
        return GdnDumpError(f"--model {name}: its {what} needs the checkpoint's own Python code "
                            "(auto_map); pass --trust-remote-code if you trust it")
    if found(hf.GatedRepoError):
        return GdnDumpError(f"--model {name} is a gated repository: accept its terms on "
                            f"https://huggingface.co/{name} and log in (hf auth login)")
    if found(hf.RepositoryNotFoundError):
        return GdnDumpError(f"--model {name}: {where}, and no such repository on the Hugging Face hub "
                            "(a private one needs hf auth login)")
    if found(hf.RevisionNotFoundError):
        return GdnDumpError(f"--model {name}: the Hugging Face hub has no revision "
                            f"{revision or 'main'!r} of it")
    if found(hf.HFValidationError):
        return GdnDumpError(f"--model {name}: {where}, and not a Hugging Face id (org/name)")
    if found(hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled) and constants.is_offline_mode():
        return GdnDumpError(f"--model {name}: {where}, and its {what} is not in the Hugging Face cache "
                            f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE=1 forbids downloading it")
    http = found(hf.HfHubHTTPError)
    if http is not None and getattr(http.response, "status_code", None) in (401, 403):
        return GdnDumpError(f"--model {name}: the Hugging Face hub refused access ({_first_line(http)}); "
                            "log in with hf auth login")
    if http is not None or found(hf.LocalEntryNotFoundError, *_network_errors()):
        return RunFailure(f"--model {name}: could not reach the Hugging Face hub for its {what} "
                          f"({_first_line(chain[-1])}); check the connection, or set HF_HUB_OFFLINE=1 "
                          "to use a cached copy")
    local = next((e for e in chain if isinstance(e, OSError) and e.errno in _RUNTIME_ERRNOS), None)
    if local is not None:
        return RunFailure(f"--model {name}: could not load its {what}: {_first_line(local)}")
    return GdnDumpError(f"--model {name}: could not load its {what} ({_first_line(exc)})")


def no_safetensors(name: str, source: str) -> GdnDumpError:
    """transformers' "no model.safetensors" OSError, said as what the directory holds instead."""
    if not Path(source).is_dir():  # a hub repository: what else it holds is not known here
        return GdnDumpError(f"--model {name} has no safetensors weights (only pickle ones, if any); "
                            "pass --allow-pickle-weights if you trust it")
    pickles = [f for f in _PICKLE_WEIGHTS if (Path(source) / f).is_file()]
    if not pickles:
        return GdnDumpError(f"--model {name}: no weights in {os.path.abspath(source)} "
                            "(neither model.safetensors nor pytorch_model.bin)")
    return GdnDumpError(f"--model {name} has only pickle weights ({pickles[0]}); "
                        "pass --allow-pickle-weights if you trust it")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes / contexts, outermost first."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of every HTTP client the hub code may use (huggingface_hub 2.x: httpx2)."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    for module_name, attr in (("httpx", "TransportError"), ("httpx2", "TransportError"),
                              ("requests.exceptions", "ConnectionError"), ("requests.exceptions", "Timeout")):
        module = _try_import(module_name)
        if hasattr(module, attr):
            types.append(getattr(module, attr))
    return tuple(types)


def loading_errors() -> tuple[type[BaseException], ...]:
    """What a failed load raises: OSError / ValueError, a raw client error that transformers lets
    through, or safetensors' error for a corrupt or truncated file (not an OSError)."""
    safetensors = _try_import("safetensors")
    return (OSError, ValueError, getattr(safetensors, "SafetensorError", OSError), *_network_errors())


def _try_import(module_name: str):
    try:
        return importlib.import_module(module_name)
    except Exception:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
