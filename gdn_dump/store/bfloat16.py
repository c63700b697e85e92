"""bfloat16 storage for Zarr v3 arrays written with zarr-python.

zarr-python 3.1 has no core bfloat16 data type, but it has a registry of data types
(``zarr.core.dtype.data_type_registry``) that accepts extension types. This module adds the
``bfloat16`` extension data type from the zarr-extensions registry
(``data-types/bfloat16``): array metadata says ``"data_type": "bfloat16"`` with no
configuration, elements are 2-byte values ``0bSEEEEEEEEMMMMMMM`` whose byte order is set by the
``bytes`` codec, and fill values use the core float encoding (a JSON number, ``"NaN"``
(= ``0x7fc0``), ``"Infinity"``, ``"-Infinity"``, or ``"0xXXXX"`` giving the raw bits).
TensorStore's zarr3 driver uses the same name and encoding, so stores are readable by both.

How zarr finds it: gdn-dump declares the class in the ``zarr.data_type`` entry-point group
(``pyproject.toml``), which zarr loads the first time it resolves a data type, so any process
where gdn-dump is installed reads bfloat16 stores (plain ``zarr.open``, ``xarray.open_zarr``)
without importing gdn_dump first. Importing this module registers nothing; writers call
:func:`zarr_dtype` (or :func:`register_bfloat16`), which registers it explicitly. Where zarr
already has a ``bfloat16`` data type (a newer zarr, or another package's), that one is kept:
the entry point names it (:data:`ZARR_BFLOAT16`), registering never replaces it, and arrays are
still written with this class, whose on-disk form is the same spec.

In memory the values are numpy arrays of ``ml_dtypes.bfloat16``, which is what torch, JAX and
TensorStore interoperate with.

Caveat: numpy sees ml_dtypes.bfloat16 as kind "V", so zarr 3.1's empty-chunk check compares it by
value, not bits: with the default ``write_empty_chunks=False`` a chunk that is entirely -0.0
under a 0.0 fill value is dropped and reads back as +0.0. Create arrays with
``config={"write_empty_chunks": True}`` where that matters.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..dtypes import ITEMSIZE
from ..errors import GdnDumpError

__all__ = [
    "BFLOAT16_NAME",
    "BFloat16",
    "is_bfloat16_supported",
    "register_bfloat16",
    "registered_bfloat16",
    "ZARR_BFLOAT16",  # noqa: F822 - resolved by the module __getattr__ (the entry points)
    "zarr_dtype",
]

BFLOAT16_NAME = "bfloat16"
_CANONICAL_NAN_BITS = 0x7FC0  # what the spec says "NaN" means for bfloat16

_UNSUPPORTED_MSG = (
    "bfloat16 storage needs zarr >= 3.1 with extension data types (zarr.core.dtype) and "
    "ml_dtypes; use --dtype float16 or float32 instead."
)

# The imports can fail on an older zarr or without ml_dtypes; the module must still import so
# that float16/float32 storage keeps working and bfloat16 fails with one clear message.
try:
    import ml_dtypes
    from zarr.core.dtype import data_type_registry
    from zarr.core.dtype.common import HasEndianness, HasItemSize

    try:  # newer zarr (where importing it from zarr.core.dtype is deprecated)
        from zarr.errors import DataTypeValidationError
    except ImportError:  # zarr 3.1
        from zarr.core.dtype.common import DataTypeValidationError
    from zarr.core.dtype.wrapper import ZDType
except ImportError:  # pragma: no cover - depends on the installed versions
    ml_dtypes = None  # type: ignore[assignment]
    BFloat16 = None  # type: ignore[assignment,misc]
else:
    _NP_BF16 = np.dtype(ml_dtypes.bfloat16)

    def _bits_to_scalar(bits: int) -> Any:
        return np.array(bits, dtype=np.uint16).view(_NP_BF16)[()]

    def _scalar_bits(value: Any) -> int:
        return int(np.asarray(value, dtype=_NP_BF16).view(np.uint16))

    @dataclass(frozen=True, kw_only=True)
    class BFloat16(ZDType, HasEndianness, HasItemSize):  # type: ignore[misc,type-arg]
        """Zarr v3 ``bfloat16`` extension data type backed by ``ml_dtypes.bfloat16``.

        ``endianness`` is only the in-memory byte order; on disk the ``bytes`` codec decides it
        (little endian by default), as for zarr's core float types. Zarr v2 has no bfloat16, so
        only the v3 format is supported.
        """

        dtype_cls = type(_NP_BF16)
        _zarr_v3_name = BFLOAT16_NAME

        @property
        def item_size(self) -> int:
            return 2

        @classmethod
        def from_native_dtype(cls, dtype: Any) -> BFloat16:
            if cls._check_native_dtype(dtype):
                big = dtype.byteorder == ">" or (dtype.byteorder == "=" and sys.byteorder == "big")
                return cls(endianness="big" if big else "little")
            raise DataTypeValidationError(f"Invalid data type: {dtype}. Expected ml_dtypes.bfloat16.")

        def to_native_dtype(self) -> np.dtype:
            return _NP_BF16.newbyteorder("<" if self.endianness == "little" else ">")

        @classmethod
        def _from_json_v2(cls, data: Any) -> BFloat16:
            raise DataTypeValidationError("bfloat16 is not a Zarr v2 data type.")

        @classmethod
        def _from_json_v3(cls, data: Any) -> BFloat16:
            # The schema allows both the bare name and {"name": "bfloat16"} (no configuration).
            if data == BFLOAT16_NAME or (
                isinstance(data, dict)
                and data.get("name") == BFLOAT16_NAME
                and not data.get("configuration")
                and set(data) <= {"name", "configuration"}
            ):
                return cls()
            raise DataTypeValidationError(f"Invalid bfloat16 JSON: {data!r}.")

        def to_json(self, zarr_format: Literal[2, 3]) -> str:  # type: ignore[override]
            if zarr_format == 3:
                return BFLOAT16_NAME
            raise DataTypeValidationError("bfloat16 is not a Zarr v2 data type; use zarr_format=3.")

        def _check_scalar(self, data: object) -> bool:
            if isinstance(data, str):
                try:
                    float(data)
                except ValueError:
                    return False
                return True
            return isinstance(data, (int, float, np.integer, np.floating, ml_dtypes.bfloat16))

        def cast_scalar(self, data: object) -> Any:
            if isinstance(data, ml_dtypes.bfloat16):
                return data  # keep the exact bits (NaN payloads) rather than going via float
            if self._check_scalar(data):
                return _NP_BF16.type(float(data))  # type: ignore[arg-type]
            raise TypeError(f"Cannot convert {data!r} ({type(data)}) to a bfloat16 scalar.")

        def default_scalar(self) -> Any:
            return _bits_to_scalar(0)

        def from_json_scalar(self, data: Any, *, zarr_format: Literal[2, 3]) -> Any:
            # zarr's own float helpers would read a 4-digit hex string as float16; bfloat16's
            # hex form is its own 16 bits, so it is decoded here.
            if isinstance(data, str) and data.startswith("0x"):
                if len(data) != 6:
                    raise ValueError(f"Invalid bfloat16 hex fill value {data!r}: expected 0x + 4 digits.")
                return _bits_to_scalar(int(data[2:], 16))
            if data == "NaN":
                return _bits_to_scalar(_CANONICAL_NAN_BITS)
            if data == "Infinity":
                return _NP_BF16.type(np.inf)
            if data == "-Infinity":
                return _NP_BF16.type(-np.inf)
            if isinstance(data, (int, float)) and not isinstance(data, bool):
                return _NP_BF16.type(float(data))
            raise TypeError(f"Invalid bfloat16 fill value {data!r}.")

        def to_json_scalar(self, data: object, *, zarr_format: Literal[2, 3]) -> float | str:
            value = self.cast_scalar(data)
            bits = _scalar_bits(value)
            if np.isnan(value):
                # "NaN" is exactly 0x7fc0; any other NaN keeps its bits in the hex form.
                return "NaN" if bits == _CANONICAL_NAN_BITS else f"0x{bits:04x}"
            if np.isinf(value):
                return "Infinity" if value > 0 else "-Infinity"
            return float(value)  # exact: every bfloat16 is a float64


def register_bfloat16() -> None:
    """Register the ``bfloat16`` data type with zarr (idempotent).

    Needed for zarr to open existing bfloat16 arrays and to accept
    ``dtype=ml_dtypes.bfloat16`` or ``dtype="bfloat16"`` in ``zarr.create_array``.
    Raises GdnDumpError when this zarr/ml_dtypes cannot support it.
    """
    if BFloat16 is None or not hasattr(data_type_registry, "register"):
        raise GdnDumpError(_UNSUPPORTED_MSG)
    if registered_bfloat16() is None:  # never replace zarr's own (or another package's) bfloat16
        data_type_registry.register(BFLOAT16_NAME, BFloat16)


def registered_bfloat16() -> Any:
    """The class zarr has registered as ``bfloat16`` (None if none yet), without making zarr load
    its entry points (this runs while zarr loads them)."""
    contents = getattr(data_type_registry, "contents", None) if BFloat16 is not None else None
    return contents.get(BFLOAT16_NAME) if isinstance(contents, dict) else None


def is_bfloat16_supported() -> bool:
    """True when bfloat16 arrays can be written and read with the installed zarr (registers it)."""
    try:
        register_bfloat16()
    except GdnDumpError:
        return False
    return True


def zarr_dtype(name: str) -> Any:
    """What ``zarr.create_array(dtype=...)`` takes for a dtype name of :mod:`gdn_dump.dtypes`.

    Numeric names give numpy dtypes; bfloat16 gives a ``BFloat16()`` instance (explicit, so no
    dtype inference is involved) after registering it so the array can be read back.
    """
    if name == BFLOAT16_NAME:
        register_bfloat16()
        return BFloat16()
    if name not in ITEMSIZE:
        raise GdnDumpError(f"unknown dtype {name!r}: expected one of {', '.join(ITEMSIZE)}")
    return np.dtype(name)


def __getattr__(name: str) -> Any:
    """The two entry points of pyproject.toml, resolved only when zarr loads them.

    ``ZARR_BFLOAT16`` (group ``zarr.data_type``): zarr registers it under its ``_zarr_v3_name``.
    A bfloat16 zarr already has (its own, in a newer zarr, or another package's) stays: then this
    names that one, and zarr's registering it again changes nothing.

    ``ZARR_BUFFER`` (group ``zarr.buffer``): zarr 3.1 to 3.4.0 collect the ``zarr.data_type``
    entry points but never load them (3.4.1 does). They do load the ``zarr.buffer`` ones the first
    time a buffer class is looked up, which opening any group does before it reads an array's
    metadata. So this registers bfloat16 and names zarr's own CPU buffer class, which zarr then
    registers again under the name it already has: buffers are unchanged.
    """
    if name == "ZARR_BFLOAT16":
        return registered_bfloat16() or BFloat16
    if name == "ZARR_BUFFER":
        from zarr.core.buffer.cpu import Buffer

        is_bfloat16_supported()
        return Buffer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
