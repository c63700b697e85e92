"""gdn-dump: stream Gated DeltaNet internals of Qwen3.5 / Qwen3-Next models into chunked Zarr stores."""

__version__ = "0.1.0"
