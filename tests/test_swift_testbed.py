"""The real all-in-one Swift of ``tests.support.swift`` works and cleans up after itself."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from swiftclient.exceptions import ClientException

from tests.support.swift import LISTING_LIMIT, SWIFT_USERS, SwiftService, start_swift

REPO_ROOT = Path(__file__).resolve().parents[1]


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_both_users_put_get_list(swift_service: SwiftService) -> None:
    print(f"swift started in {swift_service.started_in:.2f} s")
    assert swift_service.started_in < 30
    assert swift_service.auth_url == f"http://127.0.0.1:{swift_service.port}/auth/v1.0"
    assert set(swift_service.users) == {"test:tester", "chris:chris1234"}
    container = f"tb-{uuid.uuid4().hex[:8]}"
    for user in SWIFT_USERS:
        conn = swift_service.connection(user)
        try:
            conn.put_container(container)
            conn.put_object(container, f"dir/{user}.txt", f"hello {user}".encode())
            _, body = conn.get_object(container, f"dir/{user}.txt")
            assert body == f"hello {user}".encode()
            _, listing = conn.get_container(container, prefix="dir/")
            # each user is in its own account: it sees only its own object
            assert [o["name"] for o in listing] == [f"dir/{user}.txt"]
        finally:
            conn.close()


def test_wrong_key_is_refused(swift_service: SwiftService) -> None:
    conn = swift_service.connection("test:tester", "not-the-key", retries=0)
    with pytest.raises(ClientException) as info:
        conn.head_account()
    assert info.value.http_status == 401


def test_listings_are_paginated(swift_service: SwiftService) -> None:
    """The private swift.conf is in force: listings stop at LISTING_LIMIT entries."""
    container = f"tb-{uuid.uuid4().hex[:8]}"
    swift_service.put_objects(container, {f"o{i:04d}": b"" for i in range(LISTING_LIMIT + 5)})
    conn = swift_service.connection()
    _, page = conn.get_container(container)
    assert len(page) == LISTING_LIMIT
    _, full = conn.get_container(container, full_listing=True)
    assert len(full) == LISTING_LIMIT + 5


def test_servers_run_under_the_venv_python(swift_service: SwiftService) -> None:
    pids = swift_service.pids
    assert set(pids) == {"memcached", "account", "container", "object", "proxy"}
    for name, pid in pids.items():
        assert _pid_alive(pid), name
        if name != "memcached":
            exe = os.readlink(f"/proc/{pid}/exe")
            assert os.path.samefile(exe, sys.executable), (name, exe)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert any(arg.endswith(f"swift-{name}-server".encode()) for arg in cmdline)
    # nothing was read from or written to /etc/swift
    assert (swift_service.workdir / "etc" / "swift.conf").is_file()


@contextlib.contextmanager
def _netns_with_address(address: str) -> Iterator[str]:
    """A network namespace whose only interface, its loopback, also has ``address``."""
    name = f"pfleet-swift-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=20, capture_output=True)
    try:
        for argv in (["link", "set", "lo", "up"], ["addr", "add", f"{address}/32", "dev", "lo"]):
            subprocess.run(["ip", "-n", name, *argv], check=True, timeout=20,
                           capture_output=True)
        route = subprocess.run(["ip", "-n", name, "route", "get", address], check=True,
                               timeout=20, capture_output=True, text=True).stdout
        assert route.startswith("local "), route  # the address is the namespace's own
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=20,
                       capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None
                    or shutil.which("nsenter") is None,
                    reason="needs root, ip and nsenter for a network namespace")
def test_bind_address_in_a_netns_and_cleanup(tmp_path: Path) -> None:
    address = "198.51.100.77"
    client = (
        "import sys, swiftclient\n"
        "c = swiftclient.Connection(authurl=sys.argv[1], user=sys.argv[2], key=sys.argv[3],"
        " retries=1, timeout=10)\n"
        "c.put_container('ns'); c.put_object('ns', 'x', b'in the namespace')\n"
        "print(c.get_object('ns', 'x')[1].decode())\n"
    )
    with _netns_with_address(address) as netns:
        with start_swift(tmp_path, host=address, netns=netns) as service:
            assert service.auth_url == f"http://{address}:{service.port}/auth/v1.0"
            pids = dict(service.pids)
            workdir = service.workdir
            res = subprocess.run(
                [*service.nsenter, sys.executable, "-c", client, service.auth_url,
                 service.user, service.key],
                capture_output=True, text=True, timeout=60, check=False)
            assert res.returncode == 0, res.stderr
            assert res.stdout.strip() == "in the namespace"
            # the root namespace has no such address: nothing is listening here
            for pid in pids.values():
                assert _pid_alive(pid)
                assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        for name, pid in pids.items():
            assert not _pid_alive(pid), f"{name} (pid {pid}) still runs"
        assert not workdir.exists()
