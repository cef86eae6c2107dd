"""Crash records: how the job log tells a job that crashes its process from an outside kill.

A process that runs jobs arms :func:`record_crashes`: :mod:`faulthandler` then writes the
Python traceback of a fatal signal raised inside the process (SIGSEGV, SIGABRT, SIGFPE, SIGBUS,
SIGILL) to a file named after the process's lease owner, under ``<data_dir>/crashes`` (shared
by the hosts of a cluster, like the spool). A process that is killed from outside (SIGKILL,
the OOM killer, a host that loses power) leaves that file empty, and a clean stop removes it.
Whoever finds the job of a dead process (its own node at restart, or another worker once the
lease expired) reads the record with :class:`CrashRecords` to decide whose fault the lost attempt
was; see ``docs/reliability.md``.
"""

from __future__ import annotations

import faulthandler
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

CrashLookup = Callable[[str], str | None]


def crash_dir(data_dir: Path) -> Path:
    return data_dir / "crashes"


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _record_path(data_dir: Path, owner: str) -> Path:
    return crash_dir(data_dir) / (_file_name(owner) + ".log")


@contextmanager
def record_crashes(data_dir: Path, owner: str) -> Iterator[Path]:
    """Write this process's fatal-signal tracebacks to its crash record while in the block;
    the record is removed when the block ends, however it ends: only a process that dies on
    a fatal signal (or is killed) leaves it behind."""
    path = _record_path(data_dir, owner)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with path.open("w") as record:
        path.chmod(0o600)
        faulthandler.enable(file=record, all_threads=True)
        try:
            yield path
        finally:
            faulthandler.disable()
            path.unlink(missing_ok=True)


class CrashRecords:
    """The crash records under a data folder: read one by lease owner, forget it once judged."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def of(self, owner: str) -> str | None:
        """What ``owner``'s process wrote as it crashed (the fatal error line and the
        tracebacks), or ``None`` when it did not crash (or is alive)."""
        try:
            text = _record_path(self.data_dir, owner).read_text(errors="replace").strip()
        except OSError:
            return None
        return text or None

    def forget(self, owner: str) -> None:
        """Remove a dead process's record once its jobs have been judged."""
        _record_path(self.data_dir, owner).unlink(missing_ok=True)

    def forget_node(self, node_name: str) -> int:
        """Remove the records of every process of ``node_name`` (at its start, once its jobs
        have been judged: none of its processes is alive then); how many there were."""
        own = re.compile(re.escape(_file_name(node_name)) + r"_[0-9]+\.log")
        gone = 0
        for path in crash_dir(self.data_dir).glob("*.log"):
            if own.fullmatch(path.name):
                path.unlink(missing_ok=True)
                gone += 1
        return gone


def summary(record: str) -> str:
    """The first line of a crash record, e.g. ``Fatal Python error: Aborted``."""
    return record.splitlines()[0].strip()
