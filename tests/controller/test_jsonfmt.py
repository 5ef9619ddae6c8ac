"""The dev-mode JSON rendering is exactly json.dumps(indent=4)."""

from __future__ import annotations

import enum
import json
import math
from typing import Any

import pytest

from controller.api.jsonfmt import dumps_indented


class Color(enum.StrEnum):
    RED = "red"


CASES: list[Any] = [
    {}, [], (), "", 0, -1, 10**30, 1.5, -0.0, 1e300, math.inf, -math.inf, True, False, None,
    "plain", "quote \" backslash \\ tab \t newline \n", "ünïcödé ✓ 😀", "\x00\x1f\x7f",
    {"compute": {"jid": "j-1", "status": "finishedSuccessfully", "exit_code": 0,
                 "logs": "line 1\nline 2\n", "cpu_limit": 1000, "gpu_limit": 0,
                 "message": None, "timestamp": "2026-11-24T22:00:00Z"},
     "data": {"nfiles": 3, "path": "/share/key-j/incoming", "list": [1, [2, []], {}]}},
    [{"a": []}, {"b": {}}, [[[]]], ("t", 1)],
    {"message": {"jid": "must start with a letter", "args": "Missing required parameter"}},
    {1: "int key"}, {None: "none key"}, {"k": Color.RED}, [Color.RED],
    {"nan": math.nan},
]


@pytest.mark.parametrize("data", CASES)
def test_same_bytes_as_json_dumps(data: Any) -> None:
    assert dumps_indented(data) == json.dumps(data, indent=4)


def test_unserialisable_values_fail_as_json_dumps_does() -> None:
    with pytest.raises(TypeError):
        dumps_indented({"x": object()})
