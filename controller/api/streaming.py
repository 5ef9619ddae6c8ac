"""Streaming a job's outputs as a zip: produced in a worker thread, written to the
client as it is made, with a small bounded buffer (memory stays flat whatever the
size of the outputs)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from aiohttp import web

from controller.storage import outputs

log = logging.getLogger("pfleet.controller.api")


async def stream_zip(request: web.Request, root: Path, filename: str) -> web.StreamResponse:
    """Stream a zip of ``root`` produced in a worker thread, with bounded buffering."""
    response = web.StreamResponse(status=200, headers={
        "Content-Type": "application/zip",
        "Content-Disposition": f"attachment; filename={filename}"})
    await response.prepare(request)
    if request.method == "HEAD":  # aiohttp would send what is written, even to a HEAD
        await response.write_eof()
        return response
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=4)
    cancelled = False

    def produce() -> None:
        try:
            for chunk in outputs.zip_chunks(root):
                if cancelled:
                    return
                asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result()
            asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()
        except BaseException as exc:  # handed to the event loop, which logs and aborts
            if not cancelled:
                asyncio.run_coroutine_threadsafe(queue.put(exc), loop).result()

    producer = loop.run_in_executor(None, produce)
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                log.error("zip stream failed path=%s error=%s", root, item)
                raise ConnectionResetError("zip stream failed")
            await response.write(item)
        await response.write_eof()
    finally:
        cancelled = True
        while not queue.empty():
            queue.get_nowait()
        with contextlib.suppress(Exception):
            await producer
    return response
