"""The agent's WebSocket link to the controller: connect, reconnect, deliver.

One loop: connect -> hello -> welcome -> resend the outbox -> inventory -> then
stream new events, heartbeats and replies while dispatching the controller's
commands.  Failures are classified:

* transient (refused connection, timeouts, 5xx, the controller going away with
  close code 1001): retried after a jittered, growing delay that resets once a
  connection succeeds;
* an untrusted server certificate: a configuration error, but the operator may fix
  the CA file (or the controller's certificate) while the agent runs, so it is
  logged as an error naming the trust source once per distinct failure, reported by
  ``/health`` as ``certificate verify failed ...``, and retried with the same backoff;
* fatal (401/403 at the handshake, a hello the controller refuses, a protocol
  version it does not speak): ``LinkRefused`` is raised and the agent exits with a
  distinct status, because retrying cannot help.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from agent import protocol as p
from agent.outbox import Outbox

log = logging.getLogger("pfleet.agent.link")

HELLO_TIMEOUT = 15.0
REFUSED_CLOSE_CODES = {1008, 4001, 4003}  # policy violation, token revoked


class LinkRefused(Exception):
    """The controller refuses this agent; retrying will not help."""


class Backoff:
    """Delays between reconnects: a random first one, then growing by ``factor`` up
    to ``cap``; ``reset()`` after a successful connection starts over."""

    def __init__(self, first: float = 0.2, factor: float = 1.618, cap: float = 30.0) -> None:
        self.first, self.factor, self.cap = first, factor, cap
        self._delay: float | None = None

    def reset(self) -> None:
        self._delay = None

    def next(self) -> float:
        if self._delay is None:
            self._delay = random.uniform(0, self.first)
        else:
            grown = max(self.first, self._delay) * self.factor
            self._delay = min(self.cap, grown) * random.uniform(0.8, 1.0)
        return self._delay


@dataclass
class LinkCallbacks:
    hello: Callable[[], p.Hello]
    heartbeat: Callable[[], Awaitable[p.Heartbeat]]
    inventory: Callable[[], Awaitable[list[p.JobRef]]]
    command: Callable[[p.Message], Awaitable[p.Message | None]]


class Link:
    def __init__(self, url: str, token: str, outbox: Outbox, callbacks: LinkCallbacks, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.url = url
        self.token = token
        self.outbox = outbox
        self.callbacks = callbacks
        self.ssl_context = ssl_context
        self.connected = asyncio.Event()
        self.heartbeat_interval = 5.0
        self.last_error = ""
        self.trust = "the system trust store"  # what verifies the controller (for messages)

    async def run_forever(self) -> None:
        """Stay connected until cancelled; raise ``LinkRefused`` when refused."""
        delays = Backoff()
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    await self._connect_once(session, on_welcome=delays.reset)
                    self.last_error = "connection closed by the controller"
                except LinkRefused:
                    raise
                except aiohttp.ClientConnectorCertificateError as exc:
                    error = (f"certificate verify failed: {_verify_message(exc)} "
                             f"(controller {self.url}, trusting {self.trust})")
                    if error != self.last_error:
                        log.error("controller certificate not trusted: %s", error)
                    self.last_error = error
                except (aiohttp.ClientError, OSError, TimeoutError, p.ProtocolError) as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                finally:
                    self.connected.clear()
                delay = delays.next()
                log.info("controller link down, retrying in %.1f s reason=%s", delay,
                         self.last_error)
                await asyncio.sleep(delay)

    async def _connect_once(self, session: aiohttp.ClientSession,
                            on_welcome: Callable[[], None]) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            ws = await session.ws_connect(self.url, headers=headers, heartbeat=30.0,
                                          ssl=self.ssl_context if self.ssl_context else True,
                                          max_msg_size=32 << 20)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise LinkRefused(f"controller refused the agent token ({exc.status})") from exc
            raise
        async with ws:
            await ws.send_str(p.encode(self.callbacks.hello()))
            first = await ws.receive(timeout=HELLO_TIMEOUT)
            if first.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                if ws.close_code in REFUSED_CLOSE_CODES:
                    raise LinkRefused(f"controller refused the hello: {ws.close_code} "
                                      f"{first.extra or ''}")
                raise ConnectionError(f"closed during hello ({ws.close_code})")
            if first.type != aiohttp.WSMsgType.TEXT:
                raise p.ProtocolError("expected welcome")
            welcome = p.decode(first.data)
            if not isinstance(welcome, p.Welcome):
                raise p.ProtocolError(f"expected welcome, got {welcome.type}")
            self.heartbeat_interval = welcome.heartbeat_interval
            on_welcome()
            log.info("connected to controller url=%s", self.url)
            self.connected.set()
            send_lock = asyncio.Lock()

            async def send(message: p.Message) -> None:
                async with send_lock:
                    await ws.send_str(p.encode(message))

            tasks = [asyncio.create_task(self._sender(send), name="pfleet-link-sender"),
                     asyncio.create_task(self._heartbeats(send), name="pfleet-link-heartbeat")]
            try:
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    try:
                        message = p.decode(msg.data)
                    except p.ProtocolError as exc:
                        log.warning("bad message from controller error=%s", exc)
                        continue
                    if isinstance(message, p.Ack):
                        self.outbox.ack(message.seq)
                        continue
                    reply = await self.callbacks.command(message)
                    if reply is not None:
                        await send(reply)
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            if ws.close_code in REFUSED_CLOSE_CODES:
                raise LinkRefused(f"controller closed the link: {ws.close_code}")

    async def _sender(self, send: Callable[[p.Message], Awaitable[None]]) -> None:
        """Resend what is unacknowledged, then the inventory, then every new event."""
        last = 0
        for event in self.outbox.pending():
            await send(event)
            last = event.seq
        for part in p.inventory_parts(await self.callbacks.inventory()):
            await send(part)
        while True:
            self.outbox.changed.clear()
            for event in self.outbox.pending(after=last):
                await send(event)
                last = event.seq
            await self.outbox.changed.wait()

    async def _heartbeats(self, send: Callable[[p.Message], Awaitable[None]]) -> None:
        while True:
            await send(await self.callbacks.heartbeat())
            await asyncio.sleep(self.heartbeat_interval)


def _verify_message(exc: aiohttp.ClientConnectorCertificateError) -> str:
    cert_error = exc.certificate_error
    message = getattr(cert_error, "verify_message", "") or str(cert_error)
    return str(message)
