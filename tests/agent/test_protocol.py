from __future__ import annotations

import copy
import json

import pytest

from agent import protocol as p


def test_every_message_round_trips() -> None:
    spec = p.JobSpec(job="j", attempt=2, name="n", jid="n", kind="plugin", image="i",
                     command=["a", "b c"], env=["A=1"], mounts=[p.Mount("key-n/in", "/in", True)])
    messages = [
        p.Hello(version=1, agent="a", runtime="docker", capabilities={"multi_worker": False},
                labels={"z": "1"}, capacity={"cpu_millicores": 1000}, found_by="configured"),
        p.Welcome(version=1, heartbeat_interval=5.0),
        p.Heartbeat(cpu_percent=1.5, memory_total_mib=1, memory_available_mib=1,
                    disk_total_mib=2, disk_free_mib=1, gpus=0, runtime_ok=True, running=["j"]),
        p.Event(seq=3, job="j", attempt=2, state="exited", exit_code=0, logs="x\n"),
        p.Ack(seq=3), p.Inventory(jobs=[p.JobRef("j", 2, "n", "running")]), p.Run(spec=spec),
        p.Cancel(job="j", attempt=2), p.Remove(job="j", attempt=2, name="n"),
        p.Remove(job="j", attempt=2, name="n", request="r"), p.RemoveReply(request="r"),
        p.LogsRequest(request="r", job="j", attempt=2, tail=10), p.LogsReply(request="r", logs=""),
    ]
    for message in messages:
        assert p.decode(p.encode(message)) == message
        assert json.loads(p.encode(message)) == p.encode_dict(message)  # the same text


def test_encoding_leaves_the_message_alone() -> None:
    spec = p.JobSpec(job="j", attempt=1, name="n", jid="n", kind="copy", image="",
                     command=[], op={"paths": [["a", "b"]], "nested": {"k": [1]}},
                     mounts=[p.Mount("s", "/t", False)])
    run = p.Run(spec=spec)
    before = copy.deepcopy(run)
    body = json.loads(p.encode(run))
    assert body["spec"]["mounts"] == [{"source": "s", "target": "/t", "read_only": False}]
    assert body["spec"]["op"] == {"paths": [["a", "b"]], "nested": {"k": [1]}}
    assert run == before and "type" not in spec.op


@pytest.mark.parametrize("text, error", [
    ("not json", "not JSON"),
    ("[1]", "JSON object"),
    ('{"type": "nope"}', "unknown message type"),
    ('{"type": "ack"}', "missing fields"),
    ('{"type": "ack", "seq": "1"}', "wrong type"),
    ('{"type": "ack", "seq": true}', "wrong type"),
    ('{"type": "ack", "seq": 1, "extra": 2}', "unknown fields"),
    ('{"type": "event", "seq": 1, "job": "j", "attempt": 1, "state": "exploded"}',
     "unknown state"),
    ('{"type": "run", "spec": {"job": "j"}}', "missing fields"),
    ('{"type": "run", "spec": {"job": "j", "attempt": 1, "name": "n", "jid": "n", '
     '"kind": "weird", "image": "", "command": []}}', "unknown kind"),
    ('{"type": "inventory", "jobs": [{"job": "j"}]}', "bad entry"),
    ('{"type": "inventory", "jobs": [], "more": 1}', "more must be"),
])
def test_invalid_messages_are_refused(text: str, error: str) -> None:
    with pytest.raises(p.ProtocolError, match=error):
        p.decode(text)


def test_a_large_inventory_is_sent_in_parts_each_within_the_decode_limits() -> None:
    refs = [p.JobRef(f"{i:032x}", 1, f"job-{i}" + "x" * 120, "present")
            for i in range(2 * p.INVENTORY_PART + 1)]
    parts = p.inventory_parts(refs)
    assert [len(part.jobs) for part in parts] == [p.INVENTORY_PART, p.INVENTORY_PART, 1]
    assert [part.more for part in parts] == [True, True, False]
    assert [ref for part in parts for ref in p.decode(p.encode(part)).jobs] == refs
    # what fits is one message, as older controllers read it (they ignore "more")
    assert p.inventory_parts(refs[:3]) == [p.Inventory(jobs=refs[:3])]
    assert p.inventory_parts([]) == [p.Inventory(jobs=[])]
    # a single message of them all would be refused by the reader
    with pytest.raises(p.ProtocolError, match="JSON values"):
        p.decode(p.encode(p.Inventory(jobs=refs * 3)))
