"""The controller's exceptions and the HTTP answer each one becomes.

    PfleetError                      base; never reaches a client as a traceback
    ├── ConfigError                  bad settings at start (lists every problem)
    ├── ApiError                     answered as {"message": ...} with .status
    │   ├── BadRequest               400 (a str message, or a {field: reason} bundle)
    │   ├── Unauthorized             401
    │   ├── NotFound                 404
    │   ├── Conflict                 409 (pfcon's ordering guards)
    │   ├── PayloadTooLarge          413
    │   └── UnsupportedMediaType     415
    └── StoreError                   SQLite failures (answered 500)
"""

from __future__ import annotations

from typing import Any


class PfleetError(Exception):
    """Base of every error the controller raises on purpose."""


class ConfigError(PfleetError):
    """Invalid settings; the message names every bad variable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


class ApiError(PfleetError):
    status = 500

    def __init__(self, message: str | dict[str, str], status: int | None = None) -> None:
        self.message: Any = message
        if status is not None:
            self.status = status
        super().__init__(str(message))


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class PayloadTooLarge(ApiError):
    status = 413


class UnsupportedMediaType(ApiError):
    status = 415


class StoreError(PfleetError):
    """The state database failed."""
