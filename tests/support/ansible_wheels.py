"""What the Ansible tests install on their offline hosts: a wheelhouse of pfleet's
dependencies (``pfleet_wheelhouse``), a snapshot of the pfleet sources (``pfleet_source_dir``:
the role builds its wheel on the control node) and a wheel of the same sources with a
bumped local version (``pfleet_wheel``, for upgrade.yml).

The snapshot keeps a session's builds reproducible while the checkout changes under it.
The wheelhouse is downloaded once per dependency list into ``.pfleet/ansible/`` (PyPI is
reachable from this machine, not from the hosts).

PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from tests.support.ansible_image import _locked
from tests.support.daemons import REPO_ROOT, EngineStartError, run

CACHE = REPO_ROOT / ".pfleet" / "ansible"
UPGRADE_LOCAL_VERSION = "ansible.upgrade"
_SOURCES = ("pyproject.toml", "README.md", "controller", "agent")
PIP_TIMEOUT = 600.0


@dataclasses.dataclass(frozen=True)
class Wheels:
    wheelhouse: Path  # dependencies only
    source: Path  # a snapshot of the pfleet sources
    version: str  # of the snapshot
    upgrade_wheel: Path  # the same sources, version ``<version>+ansible.upgrade``

    @property
    def upgrade_version(self) -> str:
        return self.upgrade_wheel.name.split("-")[1]


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        res = run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                  timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise EngineStartError(f"pip {args[0]} took over {PIP_TIMEOUT:.0f} s") from exc
    if res.returncode != 0:
        raise EngineStartError(f"pip {' '.join(args)} failed:\n{res.stdout[-2000:]}"
                               f"{res.stderr[-2000:]}")
    return res


def wheelhouse() -> Path:
    """Wheels of every runtime dependency of pfleet (cached per dependency list)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    deps = sorted(project["dependencies"])
    key = hashlib.sha256(json.dumps([deps, sys.version_info[:2]]).encode()).hexdigest()[:12]
    target = CACHE / f"wheelhouse-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE / "wheelhouse.lock"):
        if (target / ".complete").exists():
            return target
        work = Path(tempfile.mkdtemp(prefix=".wheelhouse-", dir=CACHE))
        try:
            _pip("wheel", "--quiet", "--wheel-dir", str(work), *deps)
            (work / ".complete").write_text("\n".join(deps) + "\n")
            shutil.rmtree(target, ignore_errors=True)
            work.replace(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def snapshot(dest: Path, local_version: str = "") -> tuple[Path, str]:
    """Copy the pfleet sources to ``dest`` (with ``+local_version`` appended to the
    version); returns the directory and its version."""
    dest.mkdir(parents=True)
    for name in _SOURCES:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    pyproject = dest / "pyproject.toml"
    text = pyproject.read_text()
    version = tomllib.loads(text)["project"]["version"]
    if local_version:
        new = f"{version}+{local_version}"
        text = text.replace(f'version = "{version}"', f'version = "{new}"', 1)
        if tomllib.loads(text)["project"]["version"] != new:
            raise EngineStartError("could not bump the version in the pyproject.toml copy")
        pyproject.write_text(text)
        version = new
    return dest, version


def build_wheel(source: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    _pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out),
         str(source))
    wheels = sorted(out.glob("pfleet-*.whl"))
    if len(wheels) != 1:
        raise EngineStartError(f"expected one pfleet wheel in {out}, found {wheels}")
    return wheels[0]


def prepare(workdir: Path) -> Wheels:
    """The wheelhouse, a source snapshot and the upgrade wheel, below ``workdir``."""
    house = wheelhouse()
    source, version = snapshot(workdir / "src")
    upgrade_src, _ = snapshot(workdir / "src-upgrade", UPGRADE_LOCAL_VERSION)
    wheel = build_wheel(upgrade_src, workdir / "upgrade-wheel")
    return Wheels(wheelhouse=house, source=source, version=version, upgrade_wheel=wheel)
