"""Human units in YAML: durations such as `250ms` or `5m`, sizes such as `32MiB`.

People write timeouts and limits the way they think of them; a bare number is
read as seconds or bytes so that a value computed by a template still works.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
    None: 1,
}


def parse_duration(value: object) -> float:
    """Seconds from `250ms`, `2s`, `5m`, `1h` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration such as 250ms, 2s, 5m or 1h, not a boolean")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            unit = match.group(2)
            return float(match.group(1)) * _DURATION_FACTORS[unit]
    raise ValueError(f"a duration such as 250ms, 2s, 5m or 1h, not {value!r}")


def parse_size(value: object) -> int:
    """Bytes from `32MiB`, `512KiB`, `1GB` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError("a size such as 512KiB or 32MiB, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            unit = match.group(2).lower() if match.group(2) else None
            return int(float(match.group(1)) * _SIZE_FACTORS[unit])
    raise ValueError(f"a size such as 512KiB or 32MiB, not {value!r}")
