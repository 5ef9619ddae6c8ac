"""The suite's rule that the event loop never blocks (DESIGN §10): loops run in debug
mode, and asyncio's warnings about callbacks that held the loop are collected."""

from __future__ import annotations

import asyncio
import logging

SLOW_CALLBACK_SECONDS = 0.5  # generous: a loaded 2-core CI machine must not flake


def debug_loop_settings(loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK_SECONDS
    return loop


class SlowCallbacks(logging.Handler):
    """Collects asyncio's "Executing ... took" warnings, except those whose text holds
    one of ``ignore`` (e.g. a test's own coroutine, which may block)."""

    def __init__(self, ignore: tuple[str, ...] = ()) -> None:
        super().__init__(logging.WARNING)
        self.ignore = ignore
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if (message.startswith("Executing ") and " took " in message
                and not any(part in message for part in self.ignore)):
            self.seen.append(message)
