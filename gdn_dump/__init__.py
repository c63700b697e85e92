"""gdn-dump: stream Gated DeltaNet internals of Qwen3.5 / Qwen3-Next models into chunked Zarr stores."""

from .version import __version__

# Importing gdn_dump changes nothing outside it. zarr finds the bfloat16 data type through the
# ``zarr.data_type`` entry point (gdn_dump.store.bfloat16), in any process where gdn-dump is
# installed, whether or not it imports gdn_dump.

__all__ = ["__version__", "open_store", "Store"]


def __getattr__(name: str):
    # The reader on first use: ``import gdn_dump`` (the CLI, every worker) stays light.
    if name in ("open_store", "Store"):
        from .read import reader

        return getattr(reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
