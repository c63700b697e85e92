"""What a store records about how it was made (the group attribute ``gdn_dump``): the common part.

Library versions come from the installed distributions' metadata, so recording them imports
nothing (the store layer never imports torch).
"""

from __future__ import annotations

import datetime as _dt
import platform
from importlib import metadata

from ..version import __version__

TOOL = "gdn-dump"
LIBRARIES = ("torch", "transformers", "transformer-lens", "zarr", "numpy", "tensorstore")


def library_versions() -> dict[str, str]:
    """Python and the libraries a run depends on (``unknown`` where one is not installed)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name.replace("-", "_")] = "unknown"
    return versions


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance_base(command_line: list[str]) -> dict:
    return {
        "tool": TOOL,
        "version": __version__,
        "command_line": command_line,
        "created": now_iso(),
        "host": platform.node(),
        "libraries": library_versions(),
    }
