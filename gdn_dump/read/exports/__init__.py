"""Exports of a store into the formats other tools train from, behind a small registry.

A format is a function ``export(store, hooks, out, **options) -> list[Exported]`` registered under
the entry-point group ``gdn_dump.exports`` (``pyproject.toml``): another package can add one
without gdn-dump knowing it. Built in: ``saelens`` (:mod:`.saelens`).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from ...errors import GdnDumpError

GROUP = "gdn_dump.exports"


def formats() -> dict:
    """name -> entry point of every registered export format."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def exporter(name: str):
    """The export function of format ``name``; one line naming the known ones otherwise."""
    known = formats()
    if name not in known:
        raise GdnDumpError(f"--format {name!r}: unknown export format (known: "
                           f"{', '.join(sorted(known)) or 'none installed'})")
    return known[name].load()
