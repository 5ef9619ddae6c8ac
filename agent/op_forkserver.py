"""Start operation workers by forking a warm process instead of starting Python anew.

A fresh ``python -m agent.op_worker`` spends about 0.1 s of CPU starting the
interpreter and importing the operations before it does anything; a delete of a
small key dir then costs a hundred times its own work.  The fork server is one
long-lived child of the agent that has imported everything once (``serve``); for
each operation it forks a worker that runs ``agent.op_worker.main`` and exits.

Protocol (JSON lines; the agent writes to the server's stdin, reads its stdout):

    agent  -> server   {"id": 7, "request": PATH, "result": PATH, "stderr": PATH}
    server -> agent    {"id": 7, "pid": 1234}            or {"id": 7, "error": "..."}
    server -> agent    {"exit": 1234, "code": 0}         when that worker ended

``code`` follows ``subprocess`` (negative: killed by that signal).  A worker is a
session leader (``setsid``), like a spawned one, so it outlives an agent restart
and can be killed with its process group.  The server exits when its stdin closes
(the agent is gone); its workers carry on and are found again by pid, start time
and lock file (``agent.op_runner``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import signal
import sys
import traceback
from typing import Any

__all__ = ["ForkServer", "ForkServerError", "serve"]

log = logging.getLogger("pfleet.agent.op_forkserver")

START_TIMEOUT = 10.0  # seconds for the server to import and say it is ready
SPAWN_TIMEOUT = 5.0  # seconds for a fork to be answered
WORKER_CRASH_CODE = 70  # a worker that failed before op_worker.main could report


class ForkServerError(Exception):
    """The fork server is not usable; the caller starts the worker another way."""


# ------------------------------------------------------------------ server side


def _child(ask: dict[str, Any], keep_closed: list[int]) -> None:
    """In the forked worker: detach, point stdio at the log, run the operation, exit."""
    code = WORKER_CRASH_CODE
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        err = os.open(str(ask["stderr"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(err, 1)
        os.dup2(err, 2)
        for fd in (err, null, *keep_closed):
            os.close(fd)
        from agent import op_worker

        code = op_worker.main(["op_worker", str(ask["request"]), str(ask["result"])])
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reply(data: dict[str, Any]) -> None:
    os.write(1, (json.dumps(data) + "\n").encode())


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _reply({"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def serve() -> int:
    """The server's loop: fork a worker per request line, report each worker's end."""
    # Everything a worker needs, imported once here (no threads are started by it).
    import agent.op_worker
    import agent.ops
    import agent.ops_swift  # noqa: F401

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select through the pipe
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent's Ctrl-C is not ours
    _reply({"ready": os.getpid()})
    pending = b""
    while True:
        try:
            readable, _, _ = select.select([0, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
            _reap()
        if 0 not in readable:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            return 0  # the agent is gone; running workers carry on
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            ask: dict[str, Any] = {}
            try:
                ask = json.loads(line)
                pid = os.fork()
            except (ValueError, OSError) as exc:
                _reply({"id": ask.get("id") if isinstance(ask, dict) else None,
                        "error": str(exc)})
                continue
            if pid == 0:
                _child(ask, [wake_r, wake_w])
            _reply({"id": ask["id"], "pid": pid})


# ------------------------------------------------------------------- agent side


class ForkServer:
    """The agent's handle on one fork server process, started on first use."""

    def __init__(self, python: str, env: dict[str, str]) -> None:
        self.python = python
        self.env = env
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._asks: dict[int, asyncio.Future[int]] = {}
        self._exits: dict[int, asyncio.Future[int | None]] = {}
        self._next_id = 0
        self._starting = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def spawn(self, request: str, result: str, stderr: str) -> int:
        """Fork a worker for one request; return its pid.  Raises ``ForkServerError``."""
        await self._ensure_started()
        assert self._proc is not None and self._proc.stdin is not None
        self._next_id += 1
        ask_id = self._next_id
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._asks[ask_id] = answer
        line = json.dumps({"id": ask_id, "request": request, "result": result,
                           "stderr": stderr}) + "\n"
        try:
            self._proc.stdin.write(line.encode())
            await self._proc.stdin.drain()
            return await asyncio.wait_for(asyncio.shield(answer), SPAWN_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            await self._broken(f"no answer from the fork server: {exc!r}")
            raise ForkServerError(str(exc)) from None
        finally:
            self._asks.pop(ask_id, None)

    def exited(self, pid: int) -> asyncio.Future[int | None]:
        """Resolves to a worker's exit code, or None when the server went away first
        (the caller then watches the pid itself)."""
        future = self._exits.get(pid)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            future.set_result(None)
        return future

    def release(self, pid: int) -> None:
        self._exits.pop(pid, None)

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._fail_waiters("the fork server stopped")

    # ------------------------------------------------------------- internals

    def _usable(self) -> bool:
        return (self._proc is not None and self._proc.returncode is None
                and self._ready is not None and self._ready.done()
                and self._ready.exception() is None)

    async def _ensure_started(self) -> None:
        if self._usable():
            return
        async with self._starting:
            if not self._usable():
                await self._start()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self.python, "-m", "agent.op_forkserver",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=self.env, start_new_session=True, limit=1 << 20)
        except OSError as exc:
            raise ForkServerError(f"cannot start the fork server: {exc}") from None
        self._reader = asyncio.create_task(self._read(self._proc), name="op-forkserver-reader")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT)
        except (TimeoutError, ForkServerError) as exc:
            await self._broken(f"the fork server did not start: {exc!r}")
            raise ForkServerError("the fork server did not start") from None
        log.info("operation fork server started pid=%s", self._proc.pid)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while line := await proc.stdout.readline():
                try:
                    data = json.loads(line)
                except ValueError:
                    log.warning("fork server said something odd: %r", line[:200])
                    continue
                self._dispatch(data)
        except (OSError, ValueError) as exc:  # ValueError: a line over the limit
            log.warning("lost the fork server's output error=%r", exc)
        finally:
            if self._proc is proc:
                self._proc = None
            # No kill here: a server that closed its output is exiting, and killing it
            # would reap it under asyncio's child watcher (Popen.send_signal polls).
            self._fail_waiters("the fork server ended")

    def _dispatch(self, data: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        if "ready" in data and self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        elif "pid" in data:
            pid = int(data["pid"])
            self._exits[pid] = loop.create_future()
            answer = self._asks.get(data.get("id"))
            if answer is not None and not answer.done():
                answer.set_result(pid)
        elif "error" in data:
            answer = self._asks.get(data.get("id"))
            if answer is not None and not answer.done():
                answer.set_exception(ForkServerError(str(data["error"])))
        elif "exit" in data:
            future = self._exits.get(int(data["exit"]))
            if future is not None and not future.done():
                future.set_result(int(data["code"]))

    def _fail_waiters(self, why: str) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ForkServerError(why))
            self._ready.exception()  # retrieved: nobody may be waiting any more
        for answer in self._asks.values():
            if not answer.done():
                answer.set_exception(ForkServerError(why))
                answer.exception()
        for future in self._exits.values():
            if not future.done():
                future.set_result(None)

    async def _broken(self, why: str) -> None:
        log.warning("%s; operations start as new processes until it is restarted", why)
        proc = self._proc
        self._proc = None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        self._fail_waiters(why)


if __name__ == "__main__":
    sys.exit(serve())
