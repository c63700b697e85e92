"""gdn-dump: stream Gated DeltaNet internals of Qwen3.5 / Qwen3-Next models into chunked Zarr stores."""

from importlib.metadata import version as _version

__version__ = _version("gdn-dump")

# zarr-python 3.1 has no core bfloat16: importing gdn_dump registers the zarr-extensions
# ``bfloat16`` data type, so ``import gdn_dump`` is all a reader needs to open bfloat16 stores.
from .store.bfloat16 import is_bfloat16_supported as _bf16_ok  # noqa: E402

_bf16_ok()

__all__ = ["__version__", "open_store", "Store"]


def __getattr__(name: str):
    # The reader on first use: ``import gdn_dump`` (the CLI, every worker) stays light.
    if name in ("open_store", "Store"):
        from .read import reader

        return getattr(reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
