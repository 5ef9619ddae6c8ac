"""The messages exchanged between the controller and its agents.

This is the only module of ``agent`` the controller imports, so it holds no I/O:
plain dataclasses, ``encode()`` and ``decode()``.  Every message is one JSON object
with a ``type``; ``decode`` validates the shape and raises ``ProtocolError`` on
anything it does not understand, so neither side ever acts on a half-read message.

Who sends what (the agent always dials the controller):

    agent -> controller   hello, heartbeat, event, inventory, logs_reply
    controller -> agent   welcome, run, cancel, remove, ack, logs_request

Delivery: ``event`` messages travel through the agent's durable outbox and are
resent until the controller answers ``ack`` with their ``seq``; the controller
treats a resent event as a no-op (terminal states are sinks, old attempts are
fenced off).  Everything else is fire-and-forget: after a reconnect, ``inventory``
brings both sides back in line.
"""

from __future__ import annotations

import functools
import json
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Literal

PROTOCOL_VERSION = 1

JobKind = Literal["plugin", "copy", "upload", "delete"]
JOB_KINDS: tuple[str, ...] = ("plugin", "copy", "upload", "delete")

# What an agent can say happened to a job attempt.
#   running  - the workload has started
#   exited   - it ended on its own (exit_code, oom tell how)
#   failed   - it could not be started at all (bad image, missing GPU, runtime error)
#   lost     - the agent no longer finds it (removed behind its back)
#   removed  - it was removed on the controller's request
EventState = Literal["running", "exited", "failed", "lost", "removed"]
EVENT_STATES: tuple[str, ...] = ("running", "exited", "failed", "lost", "removed")


class ProtocolError(ValueError):
    """A message that is not valid JSON, has an unknown type or a field of the wrong shape."""


@dataclass(frozen=True)
class Mount:
    """A bind of a storeBase sub-path into the job's filesystem.

    ``source`` is relative to the storeBase root ("" is the root itself), so the
    controller never needs to know where an agent keeps the storeBase.
    """

    source: str
    target: str
    read_only: bool


@dataclass(frozen=True)
class JobSpec:
    """Everything an agent needs to run one attempt of one job."""

    job: str  # the controller's unique id for the job (stable across attempts)
    attempt: int  # increases each time the controller starts the job again
    name: str  # the runtime name: <jid>, <jid>-copy, <jid>-upload or <jid>-delete
    jid: str  # the client's job id
    kind: str  # one of JOB_KINDS
    image: str  # "" for built-in operations
    command: list[str]
    env: list[str] = field(default_factory=list)
    cpu_limit: int = 1000  # millicores
    memory_limit: int = 300  # MiB
    gpu_limit: int = 0
    number_of_workers: int = 1
    mounts: list[Mount] = field(default_factory=list)
    op: dict[str, Any] | None = None  # parameters of a built-in operation (copy/upload/delete)
    logs_tail: int = 1000  # lines of log kept with the final report

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        _require_keys(data, ("job", "attempt", "name", "jid", "kind", "image", "command"), "spec")
        try:
            mounts = [Mount(str(m["source"]), str(m["target"]), bool(m["read_only"]))
                      for m in data.get("mounts", [])]
            spec = cls(
                job=str(data["job"]),
                attempt=int(data["attempt"]),
                name=str(data["name"]),
                jid=str(data["jid"]),
                kind=str(data["kind"]),
                image=str(data["image"]),
                command=[str(c) for c in data["command"]],
                env=[str(e) for e in data.get("env", [])],
                cpu_limit=int(data.get("cpu_limit", 1000)),
                memory_limit=int(data.get("memory_limit", 300)),
                gpu_limit=int(data.get("gpu_limit", 0)),
                number_of_workers=int(data.get("number_of_workers", 1)),
                mounts=mounts,
                op=dict(data["op"]) if data.get("op") is not None else None,
                logs_tail=int(data.get("logs_tail", 1000)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"bad job spec: {exc}") from exc
        if spec.kind not in JOB_KINDS:
            raise ProtocolError(f"bad job spec: unknown kind {spec.kind!r}")
        return spec


@dataclass(frozen=True)
class JobRef:
    """One attempt of one job, as named in inventories and cancel/remove requests."""

    job: str
    attempt: int
    name: str = ""
    state: str = ""  # inventory only: the agent's view (running, exited, failed, pending)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    type: ClassVar[str] = ""


@dataclass(frozen=True)
class Hello(Message):
    type: ClassVar[str] = "hello"
    version: int
    agent: str
    runtime: str  # docker, podman, slurm, kubernetes, swarm, fake
    capabilities: dict[str, Any]  # static facts placement reads (multi_worker, gpus, ...)
    labels: dict[str, str]
    capacity: dict[str, Any]  # cpu_millicores, memory_mib, gpus, disk_free_mib
    software: str = ""  # agent version
    found_by: str = ""  # how the agent found the controller: configured, zeroconf, local


@dataclass(frozen=True)
class Welcome(Message):
    type: ClassVar[str] = "welcome"
    version: int
    heartbeat_interval: float
    controller: str = ""


@dataclass(frozen=True)
class Heartbeat(Message):
    type: ClassVar[str] = "heartbeat"
    cpu_percent: float
    memory_total_mib: int
    memory_available_mib: int
    disk_total_mib: int
    disk_free_mib: int
    gpus: int
    runtime_ok: bool
    running: list[str]  # job ids with a live workload
    problems: list[str] = field(default_factory=list)  # why the agent is unhealthy, if it is
    capacity: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Event(Message):
    type: ClassVar[str] = "event"
    seq: int
    job: str
    attempt: int
    state: str  # one of EVENT_STATES
    exit_code: int | None = None
    oom: bool = False
    message: str = ""
    started_at: str = ""  # RFC 3339 as the runtime reports it
    finished_at: str = ""
    logs: str | None = None  # final log tail, sent with exited/failed


@dataclass(frozen=True)
class Ack(Message):
    type: ClassVar[str] = "ack"
    seq: int


@dataclass(frozen=True)
class Inventory(Message):
    type: ClassVar[str] = "inventory"
    jobs: list[JobRef]
    # another part follows: an agent holding more than INVENTORY_PART attempts lists
    # them in several messages, each far below the decode limits
    more: bool = False


INVENTORY_PART = 5_000


def inventory_parts(refs: list[JobRef]) -> list[Inventory]:
    """An inventory as messages of at most INVENTORY_PART attempts (one message, empty
    or not, when it fits: what a controller that reads no ``more`` understands)."""
    starts = range(0, len(refs), INVENTORY_PART) or range(1)
    return [Inventory(jobs=refs[i:i + INVENTORY_PART], more=i + INVENTORY_PART < len(refs))
            for i in starts]


@dataclass(frozen=True)
class Run(Message):
    type: ClassVar[str] = "run"
    spec: JobSpec


@dataclass(frozen=True)
class Cancel(Message):
    type: ClassVar[str] = "cancel"
    job: str
    attempt: int


@dataclass(frozen=True)
class Remove(Message):
    type: ClassVar[str] = "remove"
    job: str
    attempt: int
    name: str = ""
    request: str = ""  # when set, the agent answers RemoveReply once it is done


@dataclass(frozen=True)
class RemoveReply(Message):
    type: ClassVar[str] = "remove_reply"
    request: str


@dataclass(frozen=True)
class LogsRequest(Message):
    type: ClassVar[str] = "logs_request"
    request: str
    job: str
    attempt: int
    tail: int


@dataclass(frozen=True)
class LogsReply(Message):
    type: ClassVar[str] = "logs_reply"
    request: str
    logs: str


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.type: cls
    for cls in (Hello, Welcome, Heartbeat, Event, Ack, Inventory, Run, Cancel, Remove,
                RemoveReply, LogsRequest, LogsReply)
}


def encode_dict(message: Message) -> dict[str, Any]:
    """The JSON-ready dict of a message, ``type`` included."""
    body = asdict(message)
    body["type"] = message.type
    return body


def encode(message: Message) -> str:
    """The JSON text of a message (what ``encode_dict`` gives, without its copy)."""
    body = _plain(message)
    body["type"] = message.type
    return json.dumps(body, separators=(",", ":"))


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _plain(value: Any) -> Any:
    """``value`` with its dataclasses turned into dicts, sharing everything else: only
    for encoding at once (``asdict`` deep-copies, the largest part of a run's cost)."""
    kind = type(value)
    if kind is str or kind is int or value is None:
        return value
    names = _FIELD_NAMES.get(kind)
    if names is None and is_dataclass(value):
        names = _FIELD_NAMES[kind] = tuple(f.name for f in fields(value))
    if names is not None:
        return {name: _plain(getattr(value, name)) for name in names}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


# Decode limits: a peer holding a valid token must not be able to stall the reader's
# event loop or swell its memory with one frame.  json.loads runs in C holding the
# GIL (no thread helps): a 32 MiB frame of "[{},{},...]" takes a second and ~800 MiB.
# Strings and the separators ({ [ ,) outside them bound the number of values (an
# inventory entry counts ~11); only frames longer than the limit are counted (~2 ms
# per MiB).  Real messages stay far below: their bulk is one string (logs), whose
# commas and brackets do not count; only a log holding a million quotes would.
MAX_VALUES = 250_000
MAX_DEPTH = 32  # copying (asdict) and re-encoding recurse: deep values would overflow
INT64 = 1 << 63  # SQLite's INTEGER: a larger seq or attempt cannot even be compared


def _values_over_limit(text: str) -> bool:
    parts = text.split('"', 4 * MAX_VALUES)  # capped: a split of millions costs as much
    if len(parts) > 4 * MAX_VALUES:  # so many quotes, even if most were escaped
        return True
    values, inside = 0, False
    for part in parts:  # outside and inside strings, alternately
        if not inside:
            values += part.count("{") + part.count("[") + part.count(",")
            inside = True
        elif (len(part) - len(part.rstrip("\\"))) % 2 == 0:  # the quote is not escaped
            values += 1
            inside = False
    return values > MAX_VALUES


def _refuse_constant(name: str) -> Any:
    raise ProtocolError(f"not JSON: {name} is not a number")


def _check_depth(data: Any, text: str) -> None:
    """Refuse values nested deeper than MAX_DEPTH; skipped when the text has too
    few brackets to reach it, so everyday messages pay nothing."""
    if text.count("{") + text.count("[") <= MAX_DEPTH:
        return
    level: list[Any] = [data]
    for _ in range(MAX_DEPTH):
        deeper: list[Any] = []
        for value in level:
            if isinstance(value, dict):
                deeper.extend(v for v in value.values() if isinstance(v, (dict, list)))
            elif isinstance(value, list):
                deeper.extend(v for v in value if isinstance(v, (dict, list)))
        if not deeper:
            return
        level = deeper
    raise ProtocolError(f"JSON nested deeper than {MAX_DEPTH}")


def decode(text: str | bytes) -> Message:
    """Parse and validate one message; raise ``ProtocolError`` when it is not one."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"not JSON: {exc}") from exc
    if len(text) > MAX_VALUES and _values_over_limit(text):
        raise ProtocolError(f"more than {MAX_VALUES} JSON values")
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ProtocolError("JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from exc
    _check_depth(data, text)
    if not isinstance(data, dict):
        raise ProtocolError("a message must be a JSON object")
    kind = data.pop("type", None)
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    if cls is Run:
        spec = data.get("spec")
        if not isinstance(spec, dict):
            raise ProtocolError("run: spec must be an object")
        return Run(spec=JobSpec.from_dict(spec))
    if cls is Inventory:
        jobs = data.get("jobs")
        if not isinstance(jobs, list):
            raise ProtocolError("inventory: jobs must be a list")
        try:
            refs = [JobRef(str(j["job"]), int(j["attempt"]), str(j.get("name", "")),
                           str(j.get("state", ""))) for j in jobs]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"inventory: bad entry: {exc}") from exc
        more = data.get("more", False)
        if not isinstance(more, bool):
            raise ProtocolError("inventory: more must be true or false")
        return Inventory(jobs=refs, more=more)
    names, required, _ = _shape(cls)
    unknown = data.keys() - names
    if unknown:
        raise ProtocolError(f"{kind}: unknown fields {sorted(unknown)}")
    _require_keys(data, required, kind)
    message = cls(**data)
    _check_types(message)
    return message


@functools.cache
def _shape(cls: type[Message]) -> tuple[frozenset[str], list[str],
                                        tuple[tuple[str, tuple[type, ...]], ...]]:
    """A message class's field names, required ones (sorted) and the type checks of
    its fields: worked out once per class, not for every message read."""
    names = frozenset(f.name for f in fields(cls))
    required = sorted(f.name for f in fields(cls)
                      if f.default is MISSING and f.default_factory is MISSING)
    checks = tuple((f.name, _FIELD_TYPES[str(f.type)]) for f in fields(cls)
                   if str(f.type) in _FIELD_TYPES)
    return names, required, checks


# ------------------------------------------------------------------------ validation

_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "dict[str, Any]": (dict,),
    "dict[str, str]": (dict,),
    "list[str]": (list,),
    "int | None": (int, type(None)),
    "str | None": (str, type(None)),
}


def _check_types(message: Message) -> None:
    for name, allowed in _shape(type(message))[2]:
        value = getattr(message, name)
        ok = isinstance(value, allowed) and not (
            isinstance(value, bool) and bool not in allowed and int in allowed)
        if ok and isinstance(value, (int, float)) and not -INT64 <= value < INT64:
            ok = False  # also 1e999, which json reads as infinity
        if not ok:
            raise ProtocolError(f"{message.type}: field {name} has the wrong type")
    # placement reads capacity values as integers: one bad value would fail every round
    if isinstance(message, (Hello, Heartbeat)) and not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and -INT64 <= v < INT64
            for v in message.capacity.values()):
        raise ProtocolError(f"{message.type}: capacity values must be numbers")
    if isinstance(message, Hello) and not all(
            isinstance(v, str) for v in message.labels.values()):
        raise ProtocolError("hello: label values must be strings")
    if isinstance(message, Event) and message.state not in EVENT_STATES:
        raise ProtocolError(f"event: unknown state {message.state!r}")


def _require_keys(data: dict[str, Any], keys: Any, where: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise ProtocolError(f"{where}: missing fields {missing}")
