"""``make run``, the README's first command, as an administrator runs it: it prints the
API URL and the dev credentials, serves a whole python-pfconclient zipfile flow on its
local agent, and stops on Ctrl-C.

Only what a test must keep private is overridden: the state directory (``STATE``, so
the repository's own ``.pfleet`` is left alone), the listening address (a free
loopback port) and ``DOCKER_HOST`` (the suite's engine, which answers, so
``scripts/ensure-docker.sh`` starts nothing).
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pfconclient import client as pfc

from tests.conftest import free_port
from tests.e2e.test_pfconclient_zipfile import client_for, plugin_descriptors, poll
from tests.support.engines import Engine
from tests.support.zips import make_zip

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 120.0  # bootstrap's checks, the engine check, the controller's start
STOP_TIMEOUT = 30.0


class MakeRun:
    """``make run`` in its own session; its output read line by line in a thread."""

    def __init__(self, state: Path, port: int, engine: Engine) -> None:
        env = {**os.environ, "DOCKER_HOST": engine.url, "PFLEET_LISTEN": f"127.0.0.1:{port}"}
        for name in ("PFLEET_STATE_DIR", "STOREBASE", "STOREBASE_MOUNT", "PFLEET_DEV"):
            env.pop(name, None)  # make run sets these itself
        self.proc = subprocess.Popen(
            ["make", "--no-print-directory", "-C", str(REPO), "run", f"STATE={state}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True, name="make-run-output").start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def _next_line(self, deadline: float) -> str | None:
        """The next output line, or None at the end of the output or the deadline."""
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if line is not None:
            self.seen.append(line)
        return line

    def wait_line(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (line := self._next_line(deadline)) is not None:
            if needle in line:
                return line
        raise AssertionError(f"no {needle!r} from make run within {timeout:.0f} s (or it "
                             "ended):\n" + "\n".join(self.seen[-40:]))  # fmt: skip

    def rest(self, timeout: float = 10.0) -> list[str]:
        """Every line after those already seen, up to the end of the output."""
        deadline = time.monotonic() + timeout
        while self._next_line(deadline) is not None:
            pass
        return self.seen

    def interrupt(self) -> int | None:
        """Ctrl-C, as at a terminal: SIGINT to the process group this test started."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            return None


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.docker
def test_make_run_serves_a_zipfile_flow_and_stops_on_ctrl_c(docker_engine: Engine,
                                                           tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "state"
    run = MakeRun(state, port, docker_engine)
    try:
        url_line = run.wait_line("pfleet controller listening:", START_TIMEOUT)
        base = f"http://127.0.0.1:{port}/api/v1/"
        assert url_line.endswith(base)
        run.wait_line("dev mode: credentials pfcon / pfcon1234", 10)
        run.wait_line("local agent: on", 10)

        client = client_for(base)
        assert client.get_server_info()["storage_env"] == "zipfile"
        data = make_zip({"in.txt": b"made by make run\n"})
        client.submit_job(pfc.JobType.PLUGIN, "mr1", plugin_descriptors(), data)
        assert poll(client, pfc.JobType.PLUGIN, "mr1") == "finishedSuccessfully"
        out = tmp_path / "out"
        client.get_plugin_job_files("mr1", str(out))
        assert (out / "in.txt.out").read_text() == "made by make run\n"
        # the Makefile's layout: state and storeBase under STATE
        assert (state / "storeBase" / "key-mr1" / "outgoing" / "in.txt.out").is_file()
        assert any((state / "state").iterdir())
        client.submit_job(pfc.JobType.DELETE, "mr1", {})
        assert poll(client, pfc.JobType.DELETE, "mr1") == "finishedSuccessfully"
        client.delete_job(pfc.JobType.PLUGIN, "mr1")
        client.delete_job(pfc.JobType.DELETE, "mr1")
    finally:
        code = run.interrupt()
    assert code is not None, "make run did not stop within 30 s of Ctrl-C"
    output = "\n".join(run.rest())
    assert "shutting down" in output
    assert "Traceback" not in output, output[-3000:]
    assert not port_open(port)
    with pytest.raises(ProcessLookupError):
        os.killpg(run.proc.pid, 0)  # nothing of the group is left running
