"""The controller's durable state: jobs, their attempts, agents and agent tokens.

One SQLite database in WAL mode under ``PFLEET_STATE_DIR``, with one connection,
used on the event loop's thread (so there is exactly one writer): its calls take
microseconds, and a commit does not wait for the disk; the checkpoints, which do,
run on a thread of their own (``Checkpointer``).  The calls made during one
iteration of the loop share one transaction (``GroupCommit``: one commit for every
write of it), each call inside a savepoint of its own, so a failed call undoes
only itself; nobody sees a result before its commit.  A ``kill -9`` at any moment
leaves either the old or the new state of every call, never a mix.

Fencing lives here: an event for an attempt other than the job's current one, or
for a job already in a terminal state, changes nothing (``apply_event`` returns
False).  ``synchronous=NORMAL`` survives a killed process (the WAL is in the OS
page cache); only a machine crash can lose the last commits.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from controller.checkpointer import MARKER_SCHEMA, Checkpointer
from controller.group_commit import GroupCommit
from controller.states import ACTIVE, TERMINAL, State

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL,
    name        TEXT NOT NULL,
    jid         TEXT NOT NULL,
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    agent       TEXT,
    spec        TEXT NOT NULL,
    image       TEXT NOT NULL,
    cmd         TEXT NOT NULL,
    message     TEXT NOT NULL DEFAULT '',
    started_at  TEXT NOT NULL DEFAULT '',
    finished_at TEXT NOT NULL DEFAULT '',
    exit_code   INTEGER,
    logs        TEXT NOT NULL DEFAULT '',
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    removed     INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_live_name ON jobs(name) WHERE removed = 0;
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
CREATE INDEX IF NOT EXISTS jobs_agent ON jobs(agent, state);
CREATE TABLE IF NOT EXISTS attempts (
    job        TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    agent      TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (job, attempt)
);
CREATE TABLE IF NOT EXISTS agents (
    name       TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen  REAL NOT NULL,
    found_by   TEXT NOT NULL DEFAULT '',
    hello      TEXT NOT NULL DEFAULT '{}',
    heartbeat  TEXT NOT NULL DEFAULT '{}',
    draining   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS agent_tokens (
    jti        TEXT PRIMARY KEY,
    agent      TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""

# What the ASSIGNED and RUNNING jobs of each agent hold: kept by triggers in the
# transaction of every write that moves a job onto or off an agent, and rebuilt
# from the jobs at each open.  A placement round reads it instead of summing the
# specs of every active job (26 ms per round with 20,000 of them).
_HOLDS = f"('{State.ASSIGNED.value}', '{State.RUNNING.value}')"
_SAME_HOLD = ("{a}.state IN " + _HOLDS + " AND {a}.agent IS {b}.agent AND {a}.spec IS {b}.spec")


def _usage_terms(row: str) -> list[str]:
    """CPU millicores, memory MiB and GPUs the job in ``row`` asks for."""
    return [f"COALESCE(json_extract({row}.spec, '$.{key}'), 0)"
            for key in ("cpu_limit", "memory_limit", "gpu_limit")]


def _usage_join(row: str) -> str:
    return (f"INSERT INTO agent_usage VALUES ({row}.agent, 1, {', '.join(_usage_terms(row))}) "
            "ON CONFLICT(agent) DO UPDATE SET jobs = jobs + 1, cpu = cpu + excluded.cpu, "
            "memory = memory + excluded.memory, gpus = gpus + excluded.gpus;")


def _usage_leave(row: str) -> str:
    cpu, memory, gpus = _usage_terms(row)
    return (f"UPDATE agent_usage SET jobs = jobs - 1, cpu = cpu - {cpu}, "
            f"memory = memory - {memory}, gpus = gpus - {gpus} WHERE agent = {row}.agent;")


def _holds(row: str) -> str:
    return f"{row}.state IN {_HOLDS} AND {row}.agent IS NOT NULL"


# Dropped and made again at each open: a newer version's triggers replace older ones.
USAGE_SCHEMA = f"""
DROP TRIGGER IF EXISTS usage_inserted;
DROP TRIGGER IF EXISTS usage_deleted;
DROP TRIGGER IF EXISTS usage_left;
DROP TRIGGER IF EXISTS usage_joined;
CREATE TABLE IF NOT EXISTS agent_usage (
    agent  TEXT PRIMARY KEY,
    jobs   INTEGER NOT NULL,
    cpu    INTEGER NOT NULL,
    memory INTEGER NOT NULL,
    gpus   INTEGER NOT NULL
);
CREATE TRIGGER usage_inserted AFTER INSERT ON jobs WHEN {_holds("new")}
BEGIN {_usage_join("new")} END;
CREATE TRIGGER usage_deleted AFTER DELETE ON jobs WHEN {_holds("old")}
BEGIN {_usage_leave("old")} END;
CREATE TRIGGER usage_left AFTER UPDATE OF state, agent, spec ON jobs
WHEN {_holds("old")} AND NOT ({_SAME_HOLD.format(a="new", b="old")})
BEGIN {_usage_leave("old")} END;
CREATE TRIGGER usage_joined AFTER UPDATE OF state, agent, spec ON jobs
WHEN {_holds("new")} AND NOT ({_SAME_HOLD.format(a="old", b="new")})
BEGIN {_usage_join("new")} END;
"""
USAGE_REBUILD = f"""
DELETE FROM agent_usage;
INSERT INTO agent_usage SELECT agent, COUNT(*), {", ".join(
    f"SUM({term})" for term in _usage_terms("jobs"))}
FROM jobs WHERE {_holds("jobs")} GROUP BY agent;
"""

LIVE_CACHE_MAX = 100_000  # cached live rows before the cache starts over
# Past this many live jobs the store stops keeping their names in memory (about 100
# bytes each), and every lookup of a name not cached asks the database again.
LIVE_NAMES_MAX = 1_000_000
WAL_SIZE_LIMIT = 64 << 20  # what a started-over WAL file is cut back to, after a burst
GET_MANY_CHUNK = 500  # ids per SELECT ... IN (...), well below SQLite's variable limit
_JOB_COLUMNS = ("id", "seq", "name", "jid", "kind", "state", "attempt", "agent", "spec",
                "image", "cmd", "message", "started_at", "finished_at", "exit_code", "logs",
                "created_at", "updated_at", "removed")
_COLUMNS = ", ".join(_JOB_COLUMNS)
_INSERT_JOB = f"INSERT INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * len(_JOB_COLUMNS))})"


@dataclass
class JobRow:
    id: str
    seq: int
    name: str
    jid: str
    kind: str
    state: State
    attempt: int
    agent: str | None
    spec: dict[str, Any]
    image: str
    cmd: str
    message: str = ""
    started_at: str = ""
    finished_at: str = ""
    exit_code: int | None = None
    logs: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    removed: bool = False

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def clone(self) -> JobRow:
        """A shallow copy: what ``copy.copy`` gives, for a fifth of its cost (one per
        status GET)."""
        twin = object.__new__(JobRow)
        twin.__dict__.update(self.__dict__)
        return twin

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRow:
        data = dict(zip(_JOB_COLUMNS, row, strict=True))
        data["state"] = State(data["state"])
        data["spec"] = json.loads(data["spec"])
        data["removed"] = bool(data["removed"])
        return cls(**data)


@dataclass
class AgentRow:
    name: str
    first_seen: float
    last_seen: float
    found_by: str
    hello: dict[str, Any] = field(default_factory=dict)
    heartbeat: dict[str, Any] = field(default_factory=dict)
    draining: bool = False


class Store:
    """Async facade over the SQLite database; its calls commit in batches."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._batches = GroupCommit(begin=self._begin_batch, end=self._end_batch)
        self._checkpointer = Checkpointer(path)
        self._db: sqlite3.Connection | None = None
        self._next_seq = 0
        # Live rows by name, as last read or written: a status GET that hits needs no
        # statement and no batch.  Every write of a job forgets its row first and
        # caches the new one once committed (before the write's caller resumes), so a
        # read after a write that completed never sees the row from before it, and the
        # GETs polling a job rarely miss.
        self._live: dict[str, JobRow] = {}
        self._live_names: dict[str, str] = {}  # job id -> its name in _live
        # Every name that may have a live row: all that have one, plus names whose
        # insert is not committed yet or was rolled back.  A name outside it has no
        # live row, so a submit's lookup of a new jid needs no batch (nor waits
        # for its commit).  Names join before their insert commits and leave only after
        # their removal did.  None: not loaded yet (before open), or too many to
        # keep (LIVE_NAMES_MAX).
        self._maybe_live: set[str] | None = None
        # Names the running batch inserted (True) or removed (False), last word wins.
        self._batch_names: dict[str, bool] = {}
        # Rows cached (or None: forgotten) by the calls of the running batch, by job
        # id: they reach _live only once the batch committed.
        self._batch_rows: dict[str, JobRow | None] | None = None
        self._close_failure: BaseException | None = None  # the closing batch's commit

    # ------------------------------------------------------------------ plumbing

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._batches.run(self._in_batch, fn, *args)

    def _in_batch(self, fn: Callable[..., T], *args: Any) -> T:
        if self._batch_rows is not None and self._db is not None and \
                not self._db.in_transaction:
            # SQLite rolled the batch back: run nothing more in it (in autocommit mode
            # a write would stay, under the error its batch is about to get)
            raise sqlite3.OperationalError("the store's transaction was rolled back")
        return fn(*args)

    def _begin_batch(self) -> None:
        db = self._db
        if db is None:  # the batch that opens the database
            return
        if db.in_transaction:
            # Left by a failed commit whose rollback failed too: never build on it (its
            # writes would be committed with the next ones).  Raising fails this batch;
            # the next one tries again.
            db.execute("ROLLBACK")
        # Deferred: a batch of reads takes no write lock (this connection is the only
        # writer; the first write of a batch takes the lock).
        db.execute("BEGIN")
        self._batch_rows = {}

    def _commit_batch(self) -> None:
        """Commit the running batch, or raise why its writes are gone."""
        db = self._db
        if db is None:  # the batch closed the database: _close committed it
            failure, self._close_failure = self._close_failure, None
            if failure is not None:
                raise failure
            return
        if not db.in_transaction:
            # SQLite rolled it back on an error (a full disk, an I/O error): the
            # batch's writes are gone, whatever its calls returned
            raise sqlite3.OperationalError("the store's transaction was rolled back")
        db.execute("COMMIT")

    def _end_batch(self) -> None:
        rows, self._batch_rows = self._batch_rows, None
        if rows is None:  # no transaction (the batch that opened the database)
            return
        try:
            self._commit_batch()
        except BaseException:
            # Nothing of the batch reached the cache: its rows wait in ``rows``, and
            # the rows it changed were dropped from the cache when it changed them.
            # Its inserted names stay in _maybe_live: a superset is still right.
            self._batch_names = {}
            with contextlib.suppress(sqlite3.Error):
                if self._db is not None and self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            raise
        for job_id, job in rows.items():
            if job is None:
                self._drop_cached(job_id)
        for job in rows.values():
            if job is not None:
                self._put_cached(job)
        names, self._batch_names = self._batch_names, {}
        maybe_live = self._maybe_live
        if maybe_live is not None:
            for name, live in names.items():
                if not live:
                    maybe_live.discard(name)

    @contextlib.contextmanager
    def _atomic(self) -> Iterator[None]:
        """A call's statements as one unit: a savepoint in the batch's transaction."""
        db = self.db
        db.execute("SAVEPOINT call")
        try:
            yield
        except BaseException:
            if db.in_transaction:  # else SQLite already rolled everything back
                db.execute("ROLLBACK TO call")
                db.execute("RELEASE call")
            raise
        db.execute("RELEASE call")

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        # Only this controller writes; another writer (an operator's shell holding a
        # write transaction) makes a write wait this long, with the loop, then fail.
        db.execute("PRAGMA busy_timeout=1000")
        db.execute("PRAGMA wal_autocheckpoint=0")  # the Checkpointer's thread does them
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        db.executescript(SCHEMA)
        db.executescript(MARKER_SCHEMA)
        db.executescript(f"BEGIN; {USAGE_SCHEMA} {USAGE_REBUILD} COMMIT;")
        self._db = db
        self._next_seq = (db.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0]) + 1
        names = db.execute("SELECT name FROM jobs WHERE removed = 0 LIMIT ?",
                           (LIVE_NAMES_MAX + 1,)).fetchall()
        self._maybe_live = {n for (n,) in names} if len(names) <= LIVE_NAMES_MAX else None
        self._checkpointer.start(self._batches)

    async def close(self) -> None:
        try:
            # not through _in_batch: the database is closed even after a failed batch
            await self._batches.run(self._close)
        finally:
            self._batches.stop()
            self._checkpointer.stop()

    def _close(self) -> None:
        db = self._db
        if db is None:
            return
        try:
            if self._batch_rows is not None:  # the calls of this batch before the close
                self._commit_batch()
        except BaseException as exc:
            self._close_failure = exc  # what those calls get from _end_batch
            with contextlib.suppress(sqlite3.Error):
                if db.in_transaction:
                    db.execute("ROLLBACK")
            raise
        finally:
            self._checkpointer.stop()  # the last connection to close checkpoints the rest
            db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "store is not open"
        return self._db

    # ---------------------------------------------------------------------- jobs

    async def insert_job(self, job: JobRow) -> JobRow:
        """Record a new job and its first attempt; fills in ``seq`` and times."""
        return await self._run(self._insert_job, job)

    def _insert_job(self, job: JobRow) -> JobRow:
        self._live.pop(job.name, None)
        now = time.time()
        job.seq, job.created_at, job.updated_at = self._next_seq, now, now
        self._next_seq += 1
        self._name_may_live(job.name)
        with self._atomic():
            self.db.execute(
                _INSERT_JOB, self._job_values(job))
            self.db.execute("INSERT INTO attempts VALUES (?, ?, ?, ?)",
                            (job.id, job.attempt, job.agent, now))
        self._batch_names[job.name] = True
        self._cache(job.clone())
        return job

    def _name_may_live(self, name: str) -> None:
        """``name`` is about to get a live row (before the write: the set must never
        miss a committed one)."""
        maybe_live = self._maybe_live
        if maybe_live is None:
            return
        if len(maybe_live) >= LIVE_NAMES_MAX:
            self._maybe_live = None
            return
        maybe_live.add(name)

    @staticmethod
    def _job_values(job: JobRow) -> tuple[Any, ...]:
        values = []
        for column in _JOB_COLUMNS:
            value = getattr(job, column)
            if column == "spec":
                value = json.dumps(value)
            elif column == "state":
                value = str(value)
            elif column == "removed":
                value = int(value)
            values.append(value)
        return tuple(values)

    async def get_live(self, name: str) -> JobRow | None:
        """The job a client can see under this runtime name (not removed)."""
        cached = self._live.get(name)
        if cached is not None:
            return cached.clone()
        maybe_live = self._maybe_live
        if maybe_live is not None and name not in maybe_live:
            return None
        return await self._run(self._get_live, name)

    def _get_live(self, name: str) -> JobRow | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM jobs "
                              "WHERE name = ? AND removed = 0", (name,)).fetchone()
        if not row:
            return None
        job = JobRow.from_row(row)
        self._cache(job)
        return job.clone()

    def _cache(self, job: JobRow) -> None:
        """Keep ``job`` (a row nobody else holds) as its name's live row once the batch
        committed."""
        if job.removed:
            self._forget(job.id)
        elif self._batch_rows is not None:
            self._batch_rows[job.id] = job
        else:
            self._put_cached(job)

    def _forget(self, job_id: str) -> JobRow | None:
        """A job row is about to change: drop its cached copy and
        return the row as it was, when known, for a write that can derive the new
        row from it."""
        before = self._drop_cached(job_id)
        if self._batch_rows is not None:
            before = self._batch_rows.get(job_id) or before
            self._batch_rows[job_id] = None
        return before

    def _put_cached(self, job: JobRow) -> None:
        # Readers get clones or whole entries: entries are replaced, never changed.
        if len(self._live) >= LIVE_CACHE_MAX:
            self._live.clear()
            self._live_names.clear()
        self._live[job.name] = job
        self._live_names[job.id] = job.name

    def _drop_cached(self, job_id: str) -> JobRow | None:
        name = self._live_names.pop(job_id, None)
        cached = self._live.get(name) if name is not None else None
        if cached is None or cached.id != job_id:  # the name went to a newer job
            return None
        del self._live[cached.name]
        return cached

    async def get_live_many(self, names: Iterable[str]) -> dict[str, JobRow]:
        names = list(names)
        return await self._run(self._get_live_many, names)

    def _get_live_many(self, names: list[str]) -> dict[str, JobRow]:
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE removed = 0 AND name IN "
            f"({', '.join('?' * len(names))})", names).fetchall()
        return {r.name: r for r in map(JobRow.from_row, rows)}

    async def get(self, job_id: str) -> JobRow | None:
        return await self._run(self._get, job_id)

    def _get(self, job_id: str) -> JobRow | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?",
                              (job_id,)).fetchone()
        return JobRow.from_row(row) if row else None

    async def get_many(self, job_ids: list[str]) -> dict[str, JobRow]:
        """The jobs of ``job_ids`` that exist, by id (one worker call for them all)."""
        return await self._run(self._get_many, job_ids)

    def _get_many(self, job_ids: list[str]) -> dict[str, JobRow]:
        found: dict[str, JobRow] = {}
        for i in range(0, len(job_ids), GET_MANY_CHUNK):
            chunk = job_ids[i:i + GET_MANY_CHUNK]
            marks = ", ".join("?" * len(chunk))
            for row in self.db.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE id IN ({marks})", chunk):
                job = JobRow.from_row(row)
                found[job.id] = job
        return found

    async def restart_job(self, job_id: str, spec: dict[str, Any], image: str,
                          cmd: str) -> JobRow:
        """Start a new attempt of a failed job with a (possibly new) request."""
        return await self._run(self._restart_job, job_id, spec, image, cmd)

    def _restart_job(self, job_id: str, spec: dict[str, Any], image: str, cmd: str) -> JobRow:
        self._forget(job_id)
        now = time.time()
        seq = self._next_seq
        self._next_seq += 1
        with self._atomic():
            self.db.execute(
                "UPDATE jobs SET attempt = attempt + 1, state = ?, agent = NULL, spec = ?, "
                "image = ?, cmd = ?, message = 'queued', started_at = '', finished_at = '', "
                "exit_code = NULL, logs = '', updated_at = ?, seq = ? WHERE id = ?",
                (State.QUEUED.value, json.dumps(spec), image, cmd, now, seq, job_id))
            attempt = self.db.execute("SELECT attempt FROM jobs WHERE id = ?",
                                      (job_id,)).fetchone()[0]
            self.db.execute("INSERT INTO attempts VALUES (?, ?, NULL, ?)", (job_id, attempt, now))
        job = self._get(job_id)
        assert job is not None
        self._cache(job.clone())
        return job

    async def assign(self, job_id: str, attempt: int, agent: str) -> bool:
        """QUEUED -> ASSIGNED on ``agent``; False if the job moved on meanwhile."""
        return await self._run(self._assign, job_id, attempt, agent)

    def _assign(self, job_id: str, attempt: int, agent: str) -> bool:
        cached = self._forget(job_id)
        now = time.time()
        with self._atomic():
            cur = self.db.execute(
                "UPDATE jobs SET state = ?, agent = ?, message = 'created', updated_at = ? "
                "WHERE id = ? AND attempt = ? AND state = ? AND removed = 0",
                (State.ASSIGNED.value, agent, now, job_id, attempt, State.QUEUED.value))
            if cur.rowcount != 1:
                return False
            self.db.execute("UPDATE attempts SET agent = ? WHERE job = ? AND attempt = ?",
                            (agent, job_id, attempt))
        if cached is not None:  # the UPDATE matched, so the cached row was this attempt's
            self._cache(replace(cached, state=State.ASSIGNED, agent=agent, message="created",
                                updated_at=now))
        return True

    async def assign_many(self, choices: list[tuple[str, int, str]]) -> list[bool]:
        """``assign`` for each (job id, attempt, agent) of a placement round, in one
        store call; all or none of them when one fails."""
        return await self._run(self._assign_many, choices)

    def _assign_many(self, choices: list[tuple[str, int, str]]) -> list[bool]:
        try:
            with self._atomic():
                return [self._assign(*choice) for choice in choices]
        except BaseException:
            for job_id, _, _ in choices:  # rows the undone assigns cached
                self._forget(job_id)
            raise

    async def requeue(self, job_id: str, attempt: int, message: str) -> bool:
        """ASSIGNED -> QUEUED (its run never reached the agent); False if it moved on."""
        return await self._run(self._requeue, job_id, attempt, message)

    def _requeue(self, job_id: str, attempt: int, message: str) -> bool:
        self._forget(job_id)
        with self._atomic():
            cur = self.db.execute(
                "UPDATE jobs SET state = ?, agent = NULL, message = ?, updated_at = ? "
                "WHERE id = ? AND attempt = ? AND state = ?",
                (State.QUEUED.value, message, time.time(), job_id, attempt,
                 State.ASSIGNED.value))
            if cur.rowcount != 1:
                return False
            # no agent holds this attempt now: a later removal must not ask the old one
            self.db.execute("UPDATE attempts SET agent = NULL WHERE job = ? AND attempt = ?",
                            (job_id, attempt))
        return True

    async def apply_event(self, job_id: str, attempt: int, state: State, *,
                          agent: str | None = None, **values: Any) -> JobRow | None:
        """Move the current attempt of a live (non-terminal) job to ``state``.

        Returns the updated job, or None when fencing refused the change: the
        attempt is not the current one, the job already reached a final state, or
        (``agent`` given: the sender of an event) the job is not placed on ``agent``.
        """
        return await self._run(self._apply_event, job_id, attempt, state, agent, values)

    def _apply_event(self, job_id: str, attempt: int, state: State, agent: str | None,
                     values: dict[str, Any]) -> JobRow | None:
        cached = self._forget(job_id)
        now = time.time()
        cur = self.db.execute(
            _event_update(tuple(values), state is State.RUNNING, agent is not None),
            (state.value, now, *values.values(), job_id, attempt, *_TERMINAL_VALUES,
             *((agent,) if agent is not None else ())))
        if cur.rowcount != 1:
            return None
        if cached is not None and cached.attempt == attempt:
            # the row as the UPDATE left it, without reading it back (and parsing its spec)
            job: JobRow | None = replace(cached, state=state, updated_at=now, **values)
        else:
            job = self._get(job_id)
        if job is not None:
            self._cache(job.clone())
        return job

    async def set_logs(self, job_id: str, attempt: int, logs: str) -> None:
        await self._run(self._set_logs, job_id, attempt, logs)

    def _set_logs(self, job_id: str, attempt: int, logs: str) -> None:
        cached = self._forget(job_id)
        cur = self.db.execute("UPDATE jobs SET logs = ? WHERE id = ? AND attempt = ?",
                              (logs, job_id, attempt))
        if cached is not None and cur.rowcount == 1 and cached.attempt == attempt:
            self._cache(replace(cached, logs=logs))

    async def mark_removed(self, job_id: str, message: str = "removed") -> JobRow | None:
        """Hide a job from clients (their DELETE); an active one ends CANCELED."""
        return await self._run(self._mark_removed, job_id, message)

    def _mark_removed(self, job_id: str, message: str) -> JobRow | None:
        self._forget(job_id)
        active = tuple(s.value for s in ACTIVE)
        with self._atomic():
            self.db.execute(
                f"UPDATE jobs SET state = ?, message = ? WHERE id = ? AND state IN "
                f"({', '.join('?' * len(active))})",
                (State.CANCELED.value, message, job_id, *active))
            cur = self.db.execute(
                "UPDATE jobs SET removed = 1, updated_at = ? WHERE id = ? AND removed = 0",
                (time.time(), job_id))
        job = self._get(job_id)
        if job is not None and cur.rowcount == 1:
            # (a job removed before may have lost its name to a newer one: not that)
            self._batch_names[job.name] = False
        return job

    async def queued(self, limit: int = 1000, after: int = 0) -> list[JobRow]:
        """Jobs waiting for an agent, oldest first (from the one after seq ``after``)."""
        return await self._run(self._by_state, (State.QUEUED,), None, limit, after)

    async def jobs_on_agent(self, agent: str, states: Iterable[State]) -> list[JobRow]:
        return await self._run(self._by_state, tuple(states), agent, 1_000_000)

    def _by_state(self, states: tuple[State, ...], agent: str | None,
                  limit: int, after: int = 0) -> list[JobRow]:
        query = (f"SELECT {_COLUMNS} FROM jobs WHERE state IN "
                 f"({', '.join('?' * len(states))}) AND seq > ?")
        args: list[Any] = [*(s.value for s in states), after]
        if agent is not None:
            query += " AND agent = ?"
            args.append(agent)
        query += " ORDER BY seq LIMIT ?"
        args.append(limit)
        return [JobRow.from_row(r) for r in self.db.execute(query, args).fetchall()]

    async def queued_and_usage(self, limit: int) -> tuple[list[JobRow],
                                                          dict[str, tuple[int, int, int]]]:
        """``queued(limit)`` and ``usage_by_agent()`` in one store call (what a
        placement round starts with)."""
        return await self._run(self._queued_and_usage, limit)

    def _queued_and_usage(self, limit: int) -> tuple[list[JobRow],
                                                     dict[str, tuple[int, int, int]]]:
        queued = self._by_state((State.QUEUED,), None, limit)
        return queued, (self._usage_by_agent() if queued else {})

    async def usage_by_agent(self) -> dict[str, tuple[int, int, int]]:
        """CPU millicores, memory MiB and GPUs held by ASSIGNED/RUNNING jobs, per agent."""
        return await self._run(self._usage_by_agent)

    def _usage_by_agent(self) -> dict[str, tuple[int, int, int]]:
        rows = self.db.execute(
            "SELECT agent, cpu, memory, gpus FROM agent_usage WHERE jobs > 0").fetchall()
        return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}

    async def active_counts(self) -> dict[str, int]:
        """ASSIGNED/RUNNING jobs per agent."""
        return await self._run(lambda: dict(self.db.execute(
            "SELECT agent, jobs FROM agent_usage WHERE jobs > 0").fetchall()))

    async def agents_with_active_jobs(self) -> list[str]:
        return await self._run(lambda: [r[0] for r in self.db.execute(
            "SELECT agent FROM agent_usage WHERE jobs > 0").fetchall()])

    async def attempt_agent(self, job_id: str, attempt: int) -> str | None:
        return await self._run(self._attempt_agent, job_id, attempt)

    def _attempt_agent(self, job_id: str, attempt: int) -> str | None:
        row = self.db.execute("SELECT agent FROM attempts WHERE job = ? AND attempt = ?",
                              (job_id, attempt)).fetchone()
        return row[0] if row else None

    async def list_jobs(self, limit: int = 200, include_removed: bool = False) -> list[JobRow]:
        return await self._run(self._list_jobs, limit, include_removed)

    def _list_jobs(self, limit: int, include_removed: bool) -> list[JobRow]:
        where = "" if include_removed else "WHERE removed = 0"
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM jobs {where} "
                               "ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [JobRow.from_row(r) for r in rows]

    # -------------------------------------------------------------------- agents

    async def agent_seen(self, name: str, found_by: str, hello: dict[str, Any]) -> None:
        await self._run(self._agent_seen, name, found_by, hello)

    def _agent_seen(self, name: str, found_by: str, hello: dict[str, Any]) -> None:
        now = time.time()
        self.db.execute(
            "INSERT INTO agents (name, first_seen, last_seen, found_by, hello) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET last_seen = excluded.last_seen,"
            " found_by = excluded.found_by, hello = excluded.hello",
            (name, now, now, found_by, json.dumps(hello)))

    async def agent_heartbeat(self, name: str, heartbeat: dict[str, Any], *,
                              seen_at: float | None = None) -> None:
        """Record an agent's heartbeat, received at ``seen_at`` (default: now)."""
        await self._run(self._agent_heartbeat, name, heartbeat,
                        time.time() if seen_at is None else seen_at)

    def _agent_heartbeat(self, name: str, heartbeat: dict[str, Any], seen_at: float) -> None:
        self.db.execute("UPDATE agents SET last_seen = ?, heartbeat = ? WHERE name = ?",
                        (seen_at, json.dumps(heartbeat), name))

    async def set_draining(self, name: str, draining: bool) -> bool:
        return await self._run(self._set_draining, name, draining)

    def _set_draining(self, name: str, draining: bool) -> bool:
        cur = self.db.execute("UPDATE agents SET draining = ? WHERE name = ?",
                              (int(draining), name))
        return cur.rowcount == 1

    async def agents(self) -> list[AgentRow]:
        return await self._run(self._agents)

    def _agents(self) -> list[AgentRow]:
        rows = self.db.execute("SELECT name, first_seen, last_seen, found_by, hello, heartbeat,"
                               " draining FROM agents ORDER BY name").fetchall()
        return [AgentRow(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5]), bool(r[6]))
                for r in rows]

    async def forget_agent(self, name: str) -> tuple[bool, int]:
        """Decommission an agent: delete its row and revoke its tokens, in one
        transaction, unless jobs are still ASSIGNED or RUNNING on it.  Returns
        (whether it was known, how many such jobs held it back)."""
        return await self._run(self._forget_agent, name)

    def _forget_agent(self, name: str) -> tuple[bool, int]:
        with self._atomic():
            if self.db.execute("SELECT 1 FROM agents WHERE name = ?", (name,)).fetchone() is None:
                return False, 0
            active = self.db.execute(
                "SELECT COUNT(*) FROM jobs WHERE agent = ? AND state IN (?, ?)",
                (name, State.ASSIGNED.value, State.RUNNING.value)).fetchone()[0]
            if active:
                return True, active
            self.db.execute("DELETE FROM agents WHERE name = ?", (name,))
            self.db.execute("UPDATE agent_tokens SET revoked_at = ? WHERE agent = ? AND "
                            "revoked_at IS NULL", (time.time(), name))
        return True, 0

    # -------------------------------------------------------------- agent tokens

    async def add_token(self, jti: str, agent: str) -> None:
        await self._run(lambda: self.db.execute(
            "INSERT INTO agent_tokens VALUES (?, ?, ?, NULL)", (jti, agent, time.time())))

    async def token_valid(self, jti: str, agent: str) -> bool:
        """Known, not revoked, and issued to this agent."""
        row = await self._run(lambda: self.db.execute(
            "SELECT agent, revoked_at FROM agent_tokens WHERE jti = ?", (jti,)).fetchone())
        return row is not None and row[0] == agent and row[1] is None

    async def revoke_tokens(self, agent: str) -> int:
        cur = await self._run(lambda: self.db.execute(
            "UPDATE agent_tokens SET revoked_at = ? WHERE agent = ? AND revoked_at IS NULL",
            (time.time(), agent)))
        return cur.rowcount


_TERMINAL_VALUES = tuple(s.value for s in TERMINAL)
_EVENT_VALUES = frozenset({"message", "started_at", "finished_at", "exit_code", "logs"})


@functools.cache
def _event_update(keys: tuple[str, ...], running: bool, by_agent: bool) -> str:
    """The UPDATE of ``apply_event`` setting ``keys`` (a few shapes, each built once)."""
    assert set(keys) <= _EVENT_VALUES, keys
    sets = "".join(f", {k} = ?" for k in keys)
    # RUNNING may only follow QUEUED/ASSIGNED; a terminal state may follow any
    # active one.  Never leave a terminal state (sinks).
    return (f"UPDATE jobs SET state = ?, updated_at = ?{sets} WHERE id = ? AND attempt = ? "
            f"AND state NOT IN ({', '.join('?' * len(_TERMINAL_VALUES))})"
            + (" AND state != 'RUNNING'" if running else "")
            + (" AND agent = ?" if by_agent else ""))


STORE = web.AppKey("pfleet.store", Store)
