"""``json.dumps(data, indent=4)``, byte for byte, at the C encoder's speed.

pfcon pretty-prints its answers in dev mode.  With ``indent`` set, the standard
library falls back to its pure-Python encoder, which made the rendering of a
status answer cost more than reading the job.  Here containers are laid out by
a small recursive function, strings go through the C escaper, numbers through
their ``repr`` as the encoder does; any
value the fast path does not know (non-string keys, other types) is handed to
``json.dumps`` itself, so the output never differs.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["dumps_indented"]

_INDENT = "    "
_string = json.encoder.encode_basestring_ascii  # C; what ensure_ascii=True uses
_FLOAT_SPECIAL = {math.inf: "Infinity", -math.inf: "-Infinity"}


class _Unknown(Exception):
    """A value outside the fast path."""


def dumps_indented(data: Any) -> str:
    """What ``json.dumps(data, indent=4)`` returns."""
    try:
        return _render(data, 0)
    except _Unknown:
        return json.dumps(data, indent=4)


def _render(value: Any, level: int) -> str:
    if isinstance(value, dict):
        if not value:
            return "{}"
        pad = "\n" + _INDENT * (level + 1)
        parts = []
        for key, item in value.items():
            if type(key) is not str:
                raise _Unknown
            parts.append(f"{pad}{_string(key)}: {_render(item, level + 1)}")
        return "{" + ",".join(parts) + "\n" + _INDENT * level + "}"
    if isinstance(value, list | tuple):
        if not value:
            return "[]"
        pad = "\n" + _INDENT * (level + 1)
        return ("[" + ",".join(pad + _render(item, level + 1) for item in value)
                + "\n" + _INDENT * level + "]")
    kind = type(value)
    if kind is str:
        return _string(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        if value != value:
            return "NaN"
        return _FLOAT_SPECIAL.get(value) or float.__repr__(value)
    raise _Unknown
