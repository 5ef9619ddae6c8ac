"""The multi-host topology of ``tests.support.topology`` works: namespaces on a bridge that
reach each other (and nothing else), one engine per host, a shared storeBase, link faults."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import time
import urllib.request

import pytest

from tests.support.daemons import ping, wait_until
from tests.support.engines import BUSYBOX_IMAGE, CONTAINER_NETWORK, run_to_completion
from tests.support.topology import HOST_NETWORK, RouteError, Topology

pytestmark = [pytest.mark.docker, pytest.mark.podman]

HTTP_PORT = 8080
FETCH = """
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1], timeout=5) as response:
    sys.stdout.write(response.read().decode())
"""


def test_topology_comes_up(fleet_topology: Topology) -> None:
    topo = fleet_topology
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in topo.timings.items())
    print(f"\ntopology up in {topo.startup_seconds:.2f} s ({timings})")
    for h in topo.hosts:
        assert h.engine is not None
        print(
            f"  {h.name} {h.ns} {h.ip} {h.engine_kind}: answers after "
            f"{h.engine.startup_seconds:.2f} s, images {h.engine.images_seconds:.2f} s"
        )
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    for ns in topo.namespaces:
        assert ns in listed.stdout
    assert [h.ip for h in topo.hosts] == ["198.51.100.11", "198.51.100.12", "198.51.100.13"]
    assert [h.engine_kind for h in topo.hosts] == ["docker", "docker", "podman"]
    assert topo.controller_ip == "198.51.100.10"
    for h in topo.hosts:
        assert h.engine_url is not None and h.engine_url.startswith("unix://")
        assert ping(h.engine_url)  # a unix socket: reachable from the root namespace
        route = topo.check_route(topo.controller_ns, h.ip)
        assert route["dev"] == "eth0" and "gateway" not in route
        assert topo.check_route(h, topo.controller_ip)["dev"] == "eth0"
    assert topo.storebase.is_dir()
    # call_in runs on a thread inside the namespace; the rest of the process stays out.
    inside = topo.call_in("ctl", lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    assert inside == os.stat(f"/run/netns/{topo.controller_ns}").st_ino
    assert inside != os.stat("/proc/thread-self/ns/net").st_ino
    # The root namespace has no leg on the bridge: no route of its own into the topology.
    root = subprocess.run(["ip", "-j", "route"], capture_output=True, text=True, timeout=10)
    assert "198.51.100." not in root.stdout


def test_http_from_controller_to_host(fleet_topology: Topology) -> None:
    topo = fleet_topology
    h1 = topo.host("h1")
    (topo.storebase / "hello.txt").write_text("hello from the shared storeBase\n")
    server = topo.run_in(
        h1,
        ["python3", "-m", "http.server", "--bind", h1.ip, "--directory", str(topo.storebase),
         str(HTTP_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(
            lambda: (
                server.poll() is None
                and topo.probe(topo.controller_ns, h1.ip, HTTP_PORT, listening=True)
            ),
            10,
            0.1,
            "http.server in h1",
        )
        url = f"http://{h1.ip}:{HTTP_PORT}/hello.txt"
        topo.check_route(topo.controller_ns, h1.ip)
        got = topo.python(topo.controller_ns, FETCH, url, timeout=15)
        assert got.returncode == 0, got.stderr
        assert got.stdout == "hello from the shared storeBase\n"
        # In this process, on a thread inside the controller namespace.
        fetched = topo.call_in(topo.controller_ns, _fetch, url)
        assert fetched == "hello from the shared storeBase\n"
        # The other hosts reach it as well, the switch namespace (no address) does not.
        for h in topo.hosts[1:]:
            assert topo.python(h, FETCH, url, timeout=15).stdout.startswith("hello")
        with pytest.raises(RouteError):
            topo.check_route(topo.switch_ns, h1.ip)
    finally:
        topo.stop(server)
    assert server.poll() is not None


def _fetch(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return response.read().decode()


def test_each_engine_runs_busybox(fleet_topology: Topology) -> None:
    for h in fleet_topology.hosts:
        client = h.client()
        try:
            out = run_to_completion(client, BUSYBOX_IMAGE, ["echo", h.name])
        finally:
            client.close()
        assert out == f"{h.name}\n".encode(), h


def test_container_addresses_on_each_host_bridge(fleet_topology: Topology) -> None:
    topo = fleet_topology
    for h in topo.hosts:
        assert h.bridge_subnet is not None
        client = h.client()
        try:
            c = client.containers.run(BUSYBOX_IMAGE, ["sleep", "30"], detach=True)
            try:
                c.reload()
                nets = c.attrs["NetworkSettings"]["Networks"]
                addrs = [n["IPAddress"] for n in nets.values() if n.get("IPAddress")]
                assert addrs, nets
                for a in addrs:
                    ip = ipaddress.ip_address(a)
                    assert ip in CONTAINER_NETWORK and ip not in HOST_NETWORK, a
                    assert ip in ipaddress.ip_network(h.bridge_subnet), (h.name, a)
                    # The host reaches its own containers on its engine bridge; the
                    # controller has no route to container networks at all.
                    assert topo.check_route(h, a)["dev"] != "eth0"
                    with pytest.raises(RouteError):
                        topo.check_route(topo.controller_ns, a)
            finally:
                c.remove(force=True)
        finally:
            client.close()


def test_storebase_is_shared_between_hosts(fleet_topology: Topology) -> None:
    topo = fleet_topology
    mount = {str(topo.storebase): {"bind": "/share", "mode": "rw"}}
    writer, reader = topo.host("h1"), topo.host("h3")  # docker writes, podman reads
    for h, cmd in (
        (writer, ["sh", "-c", "echo written-on-h1 > /share/nfs.txt"]),
        (reader, ["cat", "/share/nfs.txt"]),
    ):
        client = h.client()
        try:
            out = run_to_completion(client, BUSYBOX_IMAGE, cmd, volumes=mount)
        finally:
            client.close()
    assert out == b"written-on-h1\n"
    assert (topo.storebase / "nfs.txt").read_text() == "written-on-h1\n"


def test_link_down_and_up(fleet_topology: Topology) -> None:
    topo = fleet_topology
    h2 = topo.host("h2")
    ctl = topo.controller_ns
    assert topo.probe(ctl, h2.ip, 9)
    t0 = time.monotonic()
    topo.set_link(h2, False)
    try:
        assert not topo.link_up(h2)
        wait_until(lambda: not topo.probe(ctl, h2.ip, 9, timeout=0.5), 10, 0.1, "h2 to vanish")
        down = time.monotonic() - t0
        # The others are unaffected.
        assert topo.probe(ctl, topo.host("h1").ip, 9)
    finally:
        t1 = time.monotonic()
        topo.set_link(h2, True)
    wait_until(lambda: topo.probe(ctl, h2.ip, 9, timeout=0.5), 15, 0.1, "h2 to come back")
    print(f"\nh2 unreachable {down:.2f} s after link down, back {time.monotonic() - t1:.2f} s "
          "after link up")  # fmt: skip
    assert topo.link_up(h2)


def test_no_route_out_of_the_topology(fleet_topology: Topology) -> None:
    topo = fleet_topology
    for ns in topo.namespaces:
        assert topo.route(ns, "8.8.8.8") is None, ns
    with pytest.raises(RouteError, match="no route"):
        topo.check_route(topo.controller_ns, "8.8.8.8")
    # An unused address on the bridge is on-link (the route is right; nobody answers).
    assert topo.check_route(topo.controller_ns, "198.51.100.99")["dev"] == "eth0"


@pytest.mark.parametrize("name", ["h1", "h3"])
def test_kill_and_start_engine(fleet_topology: Topology, name: str) -> None:
    topo = fleet_topology
    h = topo.host(name)
    assert h.engine is not None and h.engine_url is not None
    old_pid = h.engine.pid
    topo.kill_engine(h)
    assert not ping(h.engine_url, timeout=0.5)
    seconds = topo.start_engine(h)
    print(f"\n{h.name} {h.engine_kind} answers {seconds:.2f} s after a restart")
    assert h.engine.pid != old_pid
    assert ping(h.engine_url)
    client = h.client()
    try:
        assert run_to_completion(client, BUSYBOX_IMAGE, ["echo", "back"]) == b"back\n"
    finally:
        client.close()
