"""Running SLURM's commands without blocking the event loop, each with a deadline.

A SLURM controller that is down makes ``sinfo``/``squeue``/``sbatch`` retry for
about ten seconds; one that hangs (stopped, or behind a dead link) makes them
wait much longer.  Every command here is an asyncio subprocess killed at its
deadline, so a dead ``slurmctld`` costs the agent a bounded wait and a clear
reason, never a stuck loop.

The commands get a small, fixed environment (``PATH``, ``HOME``, ``USER``,
``LANG``, ``TZ``, ``SLURM_CONF``) instead of the agent's own: ``sbatch`` exports
the submitting environment into the job, and the agent's token must never reach
a plugin.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass

# Variables passed on to SLURM commands (and so, through sbatch, to the job).
PASSED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "SLURM_CONF")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
KILL_WAIT_SECONDS = 5.0  # how long a killed command may take to be reaped


class SlurmCommandError(Exception):
    """A SLURM command failed, timed out or could not be run."""

    def __init__(self, argv: list[str], message: str, *, timed_out: bool = False,
                 returncode: int | None = None, stderr: str = "") -> None:
        self.argv = argv
        self.timed_out = timed_out
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(message)


@dataclass(frozen=True)
class CommandResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_text(self) -> str:
        """The command's complaint in one line."""
        text = " ".join((self.stderr or self.stdout).split())
        return text[:400] or f"exit status {self.returncode}"


def command_env(source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment SLURM commands run with (see the module docstring)."""
    source = os.environ if source is None else source
    env = {k: source[k] for k in PASSED_ENV if source.get(k)}
    env.setdefault("PATH", DEFAULT_PATH)
    if "USER" not in env:
        with contextlib.suppress(KeyError):
            env["USER"] = pwd.getpwuid(os.getuid()).pw_name
    return env


class SlurmCli:
    """Runs SLURM commands: at most ``concurrency`` at once, each killed after
    ``timeout`` seconds."""

    def __init__(self, timeout: float, concurrency: int = 8,
                 env: Mapping[str, str] | None = None) -> None:
        self.timeout = timeout
        self.env = command_env(env)
        self._slots = asyncio.Semaphore(concurrency)

    async def run(self, argv: list[str], *, deadline: float | None = None,
                  check: bool = True) -> CommandResult:
        """Run ``argv`` to its end.  Raises ``SlurmCommandError`` when it cannot be
        started, outlives its ``deadline`` (seconds; default the runner's timeout) or
        (with ``check``) exits non-zero."""
        limit = self.timeout if deadline is None else deadline
        async with self._slots:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, env=self.env)
            except OSError as exc:
                raise SlurmCommandError(argv, f"cannot run {argv[0]}: "
                                        f"{exc.strerror or exc}") from exc
            try:
                out, err = await asyncio.wait_for(proc.communicate(), limit)
            except TimeoutError:
                await _kill(proc)
                raise SlurmCommandError(argv, f"{argv[0]} did not answer within {limit:g} s",
                                        timed_out=True) from None
            except asyncio.CancelledError:
                await _kill(proc)
                raise
        result = CommandResult(argv, proc.returncode or 0, out.decode(errors="replace"),
                               err.decode(errors="replace"))
        if check and result.returncode != 0:
            raise SlurmCommandError(argv, f"{argv[0]} failed: {result.error_text}",
                                    returncode=result.returncode, stderr=result.stderr)
        return result


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(TimeoutError, ProcessLookupError):
        await asyncio.wait_for(proc.wait(), KILL_WAIT_SECONDS)
