"""Certificates for TLS tests, made by the README's own ``openssl`` commands (so the
README's recipe is what the tests run)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
# What the README's certificate names: the controller as CUBE and the agents dial it.
README_NAME = "pfleet.example.org"
README_ADDRESS = "198.51.100.10"


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path
    agent_cert: Path
    agent_key: Path


def readme_openssl_block(name: str = README_NAME, address: str = README_ADDRESS) -> str:
    """The first ``sh`` block of the README's TLS section, for a controller reached as
    ``name`` / ``address``."""
    text = README.read_text()
    section = text[text.index("\n### TLS"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "no sh block in the README's TLS section"
    return block.group(1).replace(README_NAME, name).replace(README_ADDRESS, address)


def make_certs(workdir: Path, name: str = README_NAME, address: str = README_ADDRESS) -> Certs:
    """Run the README's commands in ``workdir``: a CA, the controller's certificate for
    ``name``/``address`` and a client certificate for agent h1."""
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_openssl_block(name, address)],
                          cwd=workdir, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    made = Certs(workdir / "ca.pem", workdir / "controller.pem", workdir / "controller-key.pem",
                 workdir / "h1.pem", workdir / "h1-key.pem")
    for path in vars(made).values():
        assert path.is_file(), path
    return made
