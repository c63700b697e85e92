"""The value types of the command line: choices from the library's lists, sizes and counts,
``--state-every``, all checked while parsing so that errors come before anything runs (one line,
worded as the library words them). :mod:`.options` declares the options with them."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

from ..errors import GdnDumpError
from ..store.states import state_stride

try:  # typer >= 0.2x carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer on click
    from click import exceptions as click_errors


class OptionValueError(click_errors.BadParameter):
    """A value an option does not take. The message names the option where it says ``{option}``
    (click attaches the option after the parser raised), so it reads like the library's own."""

    def format_message(self) -> str:
        param = self.param
        name = (param.opts[0] if getattr(param, "opts", None) else None) or "the value"
        return self.message.replace("{option}", name)


class Choice:
    """One of ``choices`` (the library's list), exactly as spelled there."""

    def __init__(self, choices: Sequence[str],
                 message: str = "{option} must be one of {choices}, not {value!r}"):
        self.choices = tuple(choices)
        self.message = message

    def __call__(self, value: Any) -> str:
        if isinstance(value, str) and value in self.choices:
            return value
        text = self.message.replace("{choices}", ", ".join(self.choices))
        raise OptionValueError(text.replace("{value!r}", repr(value)))

    @property
    def metavar(self) -> str:
        return "|".join(self.choices)


SIZE_UNITS = {"": 1, "b": 1,
              "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
              "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
SIZE_HELP = ("SIZE is bytes, or a number and a unit: KiB, MiB, GiB, TiB and K, M, G, T are powers "
             "of 1024; kB, MB, GB, TB powers of 1000 (any case; e.g. 16GiB, 1.5GiB, 512MiB, 1GB, "
             "1000000, 0).")
_SIZE = re.compile(r"([+-]?)(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?([a-z]*)", re.IGNORECASE)
_NOT_FINITE = re.compile(r"[+-]?(nan|inf|infinity)[a-z]*", re.IGNORECASE)


def parse_size(value: Any, option: str = "the size") -> int:
    """``16GiB``, ``512MiB``, ``1GB``, ``1.5GiB``, ``16 GiB``, ``16gib``, ``1e9``, ``1000000``, ``0``
    -> bytes (see :data:`SIZE_HELP`). Raises :class:`ValueError`, one line naming ``option``, for
    a negative, non-finite or fractional number of bytes, an unknown unit or anything else."""
    if isinstance(value, bool):
        raise ValueError(f"{option}: cannot read the size {value!r}; use e.g. 16GiB, 512MiB, 1GB or 1000000")
    if isinstance(value, (int, float)):  # from a --config file
        if not math.isfinite(value):
            raise ValueError(f"{option} must be a finite size, not {value!r}")
        text, number, unit = str(value), Fraction(value), 1
    else:
        text = str(value)
        raw = "".join(text.split())
        if _NOT_FINITE.fullmatch(raw):
            raise ValueError(f"{option} must be a finite size, not {text!r}")
        match = _SIZE.fullmatch(raw)
        if match is None:
            raise ValueError(f"{option}: cannot read the size {text!r}; use e.g. 16GiB, 512MiB, "
                             "1GB or 1000000")
        sign, digits, exponent, suffix = match.groups()
        if suffix.lower() not in SIZE_UNITS:
            raise ValueError(f"{option}: unknown unit {suffix!r} in {text!r}; use B, kB, MB, GB, TB "
                             "(powers of 1000), KiB, MiB, GiB, TiB or K, M, G, T (powers of 1024)")
        if abs(int(exponent or 0)) > 30 or len(digits) > 30:
            raise ValueError(f"{option} {text!r} is out of range")
        number = Fraction(digits) * Fraction(10) ** int(exponent or 0) * (-1 if sign == "-" else 1)
        unit = SIZE_UNITS[suffix.lower()]
    size = number * unit
    if size < 0:
        raise ValueError(f"{option} must not be negative, not {text!r}")
    if size.denominator != 1:
        raise ValueError(f"{option} {text!r} is not a whole number of bytes"
                         + (f" ({float(size):g})" if unit != 1 else ""))
    return int(size)


COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_COUNT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?([a-z]?)", re.IGNORECASE)


def parse_count(value: Any, option: str = "the count") -> int:
    """``50M``, ``2B``, ``1.5k``, ``1e6``, ``1000000`` -> a whole number (K, M, B or G, T: powers
    of 1000). Raises :class:`ValueError`, one line naming ``option``, for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):  # from a --config file
        return value
    text = str(value)
    match = _COUNT.fullmatch("".join(text.split()))
    if match is None or match[3].lower() not in COUNT_UNITS:
        raise ValueError(f"{option}: cannot read the count {text!r}; use e.g. 50M, 2B, 100k or 1000000")
    digits, exponent, unit = match.groups()
    if len(digits) > 20 or int(exponent or 0) > 20:
        raise ValueError(f"{option} {text!r} is out of range")
    number = Fraction(digits) * 10 ** int(exponent or 0) * COUNT_UNITS[unit.lower()]
    if number.denominator != 1:
        raise ValueError(f"{option} {text!r} is not a whole number")
    return int(number)


def count_option(value: Any) -> int:
    try:
        return parse_count(value, "{option}")
    except ValueError as exc:
        raise OptionValueError(str(exc)) from None


def size_option(value: Any) -> int:
    try:
        return parse_size(value, "{option}")  # named once click has attached the option
    except ValueError as exc:
        raise OptionValueError(str(exc)) from None


def state_every_option(value: Any) -> str:
    """A stride (``64``) or ``final``, checked by the library's own parser."""
    try:
        state_stride(value)
    except GdnDumpError as exc:
        raise OptionValueError(str(exc).replace("--state-every", "{option}")) from None
    return str(value).strip()
