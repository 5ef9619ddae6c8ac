"""Removals on request that are not done yet, each written down until its workload
is gone (the supervisor's module doc says why a marker of its own).

A marker is ``<state>/jobs/removing/<job>.<attempt>.json``; the supervisor deletes
it once ``removed`` is in the outbox.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.durable import DurableWriter
from agent.runtimes.base import Handle

log = logging.getLogger("pfleet.agent.supervisor")


@dataclass
class Removal:
    """A workload to remove, written down before the job record goes (see module doc).

    ``handle`` is None when the workload was still being created: it is then found
    by listing the runtime.  ``report``: a live attempt was dropped, so ``removed``
    is reported once it is gone (an ended attempt already had its final event)."""

    job: str
    attempt: int
    name: str
    handle: Handle | None
    report: bool
    restored: bool = False  # loaded after a restart: `removed` may already be queued
    failures: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.job, self.attempt)

    def to_json(self) -> str:
        return json.dumps({"job": self.job, "attempt": self.attempt, "name": self.name,
                           "handle": self.handle.to_dict() if self.handle else None,
                           "report": self.report})

    @classmethod
    def from_json(cls, text: str) -> Removal:
        data = json.loads(text)
        if (not isinstance(data, dict) or not isinstance(data.get("job"), str)
                or not data["job"] or type(data.get("attempt")) is not int):
            raise ValueError("not a removal marker (an object with job and attempt)")
        handle = Handle.from_dict(data["handle"]) if data.get("handle") else None
        return cls(data["job"], data["attempt"], str(data.get("name", "")), handle,
                   bool(data.get("report")), restored=True)


class PendingRemovals(dict[tuple[str, int], Removal]):
    """The removals still to do, by (job, attempt), each also written down as a marker."""

    def __init__(self, directory: Path, records: DurableWriter,
                 set_aside: Callable[[Path, Exception], None]) -> None:
        super().__init__()
        self.directory = directory  # made at its first marker
        self._records = records
        self._set_aside = set_aside  # what to do with a marker that cannot be read

    def remember(self, removal: Removal) -> None:
        self[removal.key] = removal
        try:
            self.directory.mkdir(exist_ok=True)
            self._records.replace(self.path(removal), removal.to_json().encode())
        except OSError as exc:  # a full disk: retried while the agent runs, not after
            log.error("cannot write removal marker path=%s error=%s", self.path(removal), exc)

    def unmark(self, removal: Removal) -> None:
        """Delete the marker of a removal that is done."""
        try:
            self.path(removal).unlink(missing_ok=True)
        except OSError as exc:
            log.error("cannot delete removal marker path=%s error=%s", self.path(removal), exc)

    def path(self, removal: Removal) -> Path:
        return self.directory / f"{removal.job}.{removal.attempt}.json"

    def load(self) -> list[Removal]:
        """Take on the removals a previous run left written down; unreadable markers
        are set aside.  Returns those loaded."""
        loaded = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                removal = Removal.from_json(path.read_text())
                if path.name != self.path(removal).name:
                    raise ValueError(f"marker of {removal.job!r} attempt {removal.attempt}")
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                self._set_aside(path, exc)
                continue
            self[removal.key] = removal
            loaded.append(removal)
        return loaded
