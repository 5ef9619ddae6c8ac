"""The Ansible test hosts' image: Debian bookworm made with ``debootstrap`` on this
machine (the hosts have no network), with what the roles install already present so that
their package tasks find it: python3 (+ venv, apt bindings), docker.io, podman with
netavark, munge, slurm-client and charliecloud-runtime, and systemd (not as PID 1: for
``systemd-analyze verify`` and the units the rendered ones refer to).

The root filesystem is built once into a tarball cached in ``.pfleet/images`` (like
``scripts/build-test-images.sh``'s), then imported into an engine when that engine lacks
the image. Concurrent sessions serialise the build on a lock file.

PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.daemons import REPO_ROOT, EngineStartError, run

CACHE = Path(os.environ.get("PFLEET_IMAGE_CACHE", REPO_ROOT / ".pfleet" / "images"))
MIRROR = os.environ.get("PFLEET_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
# Bump when the package list or the clean-up below changes: the cached tarball is rebuilt.
RECIPE = 1
IMAGE = f"localhost/pfleet-ansible/target:r{RECIPE}"
PACKAGES = [
    "python3", "python3-venv", "python3-apt", "systemd", "iproute2", "procps", "iptables",
    "ca-certificates", "docker.io", "podman", "netavark", "aardvark-dns", "conmon", "crun",
    "munge", "slurm-client", "charliecloud-runtime",
]
BUILD_TIMEOUT = 900.0
# Left out of the tarball: downloaded packages, documentation, translations.
_PRUNE = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
          "usr/share/locale", "usr/share/info")


@contextlib.contextmanager
def _locked(path: Path, timeout: float = BUILD_TIMEOUT) -> Iterator[None]:
    with open(path, "w") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EngineStartError(f"{path} held for {timeout:.0f} s") from None
                time.sleep(0.5)
        yield


def tarball() -> tuple[Path, float]:
    """The cached root filesystem tarball (built when missing) and the seconds spent."""
    target = CACHE / f"ansible-target-r{RECIPE}.tar"
    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with _locked(CACHE / "ansible-target.lock"):
        if target.is_file() and target.stat().st_size > 0:
            return target, time.monotonic() - t0
        if shutil.which("debootstrap") is None:
            raise EngineStartError("debootstrap is missing: run scripts/bootstrap.sh")
        work = Path(tempfile.mkdtemp(prefix=".ansible-target-", dir=CACHE))
        try:
            rootfs = work / "rootfs"
            argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                    SUITE, str(rootfs), MIRROR]
            try:
                res = run(argv, timeout=BUILD_TIMEOUT)
            except subprocess.TimeoutExpired as exc:
                raise EngineStartError(f"debootstrap took over {BUILD_TIMEOUT:.0f} s") from exc
            if res.returncode != 0:
                log = rootfs / "debootstrap" / "debootstrap.log"
                detail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise EngineStartError(f"debootstrap failed ({res.returncode}):\n"
                                       f"{res.stderr[-3000:]}\n{detail}")
            for sub in _PRUNE:
                shutil.rmtree(rootfs / sub, ignore_errors=True)
            (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
            # Daemons must not start from package scripts inside a later image build.
            policy = rootfs / "usr/sbin/policy-rc.d"
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            part = work / "rootfs.tar"
            res = run(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf",
                       str(part), "."], timeout=300)
            if res.returncode != 0:
                raise EngineStartError(f"tar of the target rootfs failed: {res.stderr}")
            part.replace(target)  # atomic: others never see half a file
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target, time.monotonic() - t0


def ensure_image(docker: list[str]) -> float:
    """Import the image into the engine ``docker`` (argv prefix of its CLI) when it lacks
    it; seconds spent (building the tarball included)."""
    t0 = time.monotonic()
    if run([*docker, "image", "inspect", IMAGE], timeout=60).returncode == 0:
        return time.monotonic() - t0
    tar, _ = tarball()
    res = run([*docker, "import", "-c", 'CMD ["/bin/bash"]', "-c", "ENV LANG=C.UTF-8",
               str(tar), IMAGE], timeout=600)
    if res.returncode != 0:
        raise EngineStartError(f"docker import of {tar} failed: {res.stderr}")
    return time.monotonic() - t0
