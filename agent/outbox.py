"""The agent's durable outbox: every event is on disk before it is sent.

Closes one loss path: an agent killed (or a link dropped) between a job's state
change and the controller hearing of it.  Each event is written to its own file
(temp file, ``os.replace``; fsynced in the background, see ``agent.durable``) named
by a zero-padded sequence number, sent, and deleted only when the controller acks
that sequence number.  After a restart
the files are read back and resent in order.

``enqueue`` never raises: if the disk refuses the write the event is kept in memory
(logged), so a full disk degrades durability but never stops reporting.

Receivers must treat a resent event as a no-op: the controller fences by attempt
and never leaves a terminal state, so duplicates are harmless.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, fields, replace
from pathlib import Path

from agent.durable import DurableWriter
from agent.protocol import Event, ProtocolError, decode

log = logging.getLogger("pfleet.agent.outbox")

_WIDTH = 16


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._pending: dict[int, Event] = {}
        self._writer = DurableWriter("outbox")
        for path in sorted(self.directory.glob("*.json")):
            try:
                event = _load(path)
            except (OSError, ValueError, ProtocolError) as exc:
                log.error("dropping unreadable outbox entry path=%s error=%s", path, exc)
                path.unlink(missing_ok=True)
                continue
            self._pending[event.seq] = event
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        self._next = max(self._pending, default=0) + 1
        self.changed = asyncio.Event()

    def enqueue(self, event: Event) -> Event:
        """Give the event the next sequence number and make it durable. Never raises."""
        event = replace(event, seq=self._next)
        self._next += 1
        self._pending[event.seq] = event
        try:
            self._write(event)
        except OSError as exc:  # keep it in memory: reporting must go on
            log.error("outbox write failed, event kept in memory seq=%s job=%s error=%s",
                      event.seq, event.job, exc)
        self.changed.set()
        return event

    def _write(self, event: Event) -> None:
        self._writer.replace(self.directory / f"{event.seq:0{_WIDTH}d}.json",
                             json.dumps(asdict(event)).encode())

    def close(self) -> None:
        """Finish the background fsyncs (blocking)."""
        self._writer.close()

    def ack(self, seq: int) -> None:
        if self._pending.pop(seq, None) is not None:
            (self.directory / f"{seq:0{_WIDTH}d}.json").unlink(missing_ok=True)

    def pending(self, after: int = 0) -> list[Event]:
        """Unacknowledged events with a sequence number above ``after``, in order."""
        return [self._pending[s] for s in sorted(self._pending) if s > after]

    def pending_jobs(self) -> set[tuple[str, int]]:
        return {(e.job, e.attempt) for e in self._pending.values()}

    def __len__(self) -> int:
        return len(self._pending)


def _load(path: Path) -> Event:
    """The event of one outbox file, validated like one from the wire.  Its sequence
    number is the file's (what ``ack`` deletes); fields an agent of another version
    wrote are left out rather than losing a final event."""
    seq = int(path.stem)
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    known = {f.name for f in fields(Event)}
    unknown = sorted(set(data) - known)
    if unknown:
        log.warning("ignoring unknown fields of outbox entry path=%s fields=%s", path, unknown)
    body = {k: v for k, v in data.items() if k in known} | {"seq": seq, "type": Event.type}
    event = decode(json.dumps(body))
    if not isinstance(event, Event):
        raise ValueError("not an event")
    return event
