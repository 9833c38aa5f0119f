"""Sizes and durations as the config writes them (``256Mi``, ``30s``, ``24h``): a leaf module.

``format_size`` and ``format_duration`` write values back the same way (``config show``): each result
parses to the same number again.

Both ``settings`` and ``access_settings`` parse them; neither imports the other for it.
"""

from __future__ import annotations

import re

from toolcell.errors import ConfigError
from toolcell.quoting import quote

__all__ = ["format_duration", "format_size", "parse_duration", "parse_size"]

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mi": 1024**2, "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gi": 1024**3, "gib": 1024**3}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)\s*")


def parse_size(value: int | str, key: str) -> int:
    """Bytes from an integer or ``<number><unit>`` (k, Ki, M, Mi, G, Gi, with or without b)."""
    if isinstance(value, int):
        return value
    m = _SIZE.fullmatch(value)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _SIZE_UNITS:
        raise ConfigError(f"not a size: {quote(value)} (use e.g. 256Mi)", key=key)
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: float | str, key: str) -> float:
    """Seconds from a number or ``<number><unit>`` (ms, s, m, h)."""
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION.fullmatch(value)
    if not m:
        raise ConfigError(f"not a duration: {quote(value)} (use e.g. 30s)", key=key)
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


_BINARY_UNITS = (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024))
_MS_UNITS = (("h", 3_600_000), ("m", 60_000), ("s", 1000))


def format_size(value: int) -> int | str:
    """``256Mi`` for 268435456: the largest binary unit that divides ``value`` exactly, else the plain integer."""
    for unit, factor in _BINARY_UNITS:
        if value and value % factor == 0:
            return f"{value // factor}{unit}"
    return value


def format_duration(seconds: float) -> str:
    """``20s``, ``5m``, ``24h``, ``700ms``: the largest unit that writes ``seconds`` as a whole number."""
    ms = seconds * 1000
    whole = round(ms)
    if abs(ms - whole) > 1e-6 * max(1.0, abs(ms)):  # finer than a millisecond
        return f"{ms:.6f}".rstrip("0").rstrip(".") + "ms"
    if whole == 0:
        return "0s"
    for unit, factor in _MS_UNITS:
        if whole % factor == 0:
            return f"{whole // factor}{unit}"
    return f"{whole}ms"
