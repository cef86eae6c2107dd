"""A `dicom-ai-node serve` process, as operators run it, for the process-level suites.

``serve`` is a supervisor with a child process per role; it runs in a session of its own,
so that the test can find its children and wait until the whole node is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from sqlalchemy import Engine

from dicom_ai_node.jobs.db import create_db_engine, read_only
from dicom_ai_node.processes import ChildState, ProcessStatus
from tests.support.helpers import ROOT, free_port, wait_for


class Served:
    """A `dicom-ai-node serve` process on a free port with its data in a folder.

    By default alone, with SQLite in ``tmp_path / "var"``. As a node of a cluster: ``bind``
    its own loopback address, ``database_url`` the shared PostgreSQL job log, ``data_dir``
    the shared data folder and ``node_name`` its name (which also names its log file).
    """

    def __init__(
        self,
        tmp_path: Path,
        config: Path | None = None,
        *,
        bind: str = "127.0.0.1",
        database_url: str = "",
        data_dir: Path | None = None,
        node_name: str | None = None,
    ) -> None:
        self.port = free_port()
        self.http_port = free_port()
        self.bind = bind
        self.data = data_dir or tmp_path / "var"
        self.database_url = database_url or f"sqlite:///{self.data / 'jobs.sqlite'}"
        self.node_name = node_name
        self.env = {
            **os.environ,
            "DICOM_AI_NODE_DICOM__BIND": bind,
            "DICOM_AI_NODE_DICOM__PORT": str(self.port),
            "DICOM_AI_NODE_HTTP__BIND": bind,
            "DICOM_AI_NODE_HTTP__PORT": str(self.http_port),
            "DICOM_AI_NODE_STORAGE__DATA_DIR": str(self.data),
            "DICOM_AI_NODE_STORAGE__MIN_FREE_MB": "0",
            "DICOM_AI_NODE_ASSEMBLE__STABLE_SECONDS": "0.5",
            "DICOM_AI_NODE_WORKER__LEASE_SECONDS": "5",
        }
        if database_url:
            self.env["DICOM_AI_NODE_DATABASE__URL"] = database_url
        if node_name is not None:
            self.env["DICOM_AI_NODE_NODE_NAME"] = node_name
        if config is not None:
            self.env["DICOM_AI_NODE_CONFIG"] = str(config)
        self.args: list[str] = []  # of serve, e.g. --role
        self.log = tmp_path / f"{node_name or 'serve'}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> None:
        """Start ``serve``; with ``wait``, return once all its processes are ready (failing
        if it exits). It runs in a session (and process group) of its own, so that
        :meth:`kill` ends it with every process it started."""
        if self.proc is not None and self.proc.poll() is None:
            raise AssertionError("serve is running already; stop it first (it would leak)")
        for stale in self._status_files():  # of a killed supervisor
            stale.unlink()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_ai_node", "serve", *self.args],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        if wait:
            self.wait_listening()

    def wait_listening(self, timeout: float = 180) -> None:
        """Return once every process of ``serve`` is ready (the receivers accept DICOM
        connections); fail if it exits first."""

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited: {self.log.read_text()}")
            processes = self.processes()
            return bool(processes) and all(child.ready for child in processes)

        wait_for(ready, timeout=timeout, interval=0.1)

    def _status_files(self) -> list[Path]:
        return sorted((self.data / "run").glob(f"{self.node_name or '*'}/processes.json"))

    def processes(self) -> list[ChildState]:
        """The node's processes as its supervisor last described them."""
        found = self._status_files()
        if not found:
            return []
        assert len(found) == 1, found
        return ProcessStatus(self.data, found[0].parent.name).read()

    def signal(self, sig: int) -> int:
        """Send ``sig`` to the supervisor; its exit status once it and its children are gone."""
        assert self.proc is not None
        proc, self.proc = self.proc, None
        proc.send_signal(sig)
        return _gone(proc, timeout=120)

    def children(self, role: str | None = None) -> list[int]:
        """The pids of the supervisor's live children (of ``role``), as it last described
        them; each is checked to be a live process of the node's group."""
        assert self.proc is not None
        members = group_members(self.proc.pid)
        return sorted(
            child.pid
            for child in self.processes()
            if child.running and child.pid in members and role in (None, child.role)
        )

    def kill(self) -> int | None:
        """SIGKILL the whole process group (``serve`` and its children) at once, as a host
        that is lost, if it runs; the exit status of ``serve``. Nothing of it is left."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return _gone(proc)

    def url(self, path: str = "") -> str:
        return f"http://{self.bind}:{self.http_port}{path}"

    def engine(self) -> Engine:
        return read_only(create_db_engine(self.database_url))


def _gone(proc: subprocess.Popen[bytes], timeout: float | None = None) -> int:
    """The exit status of ``serve`` once it and every process of its group have ended."""
    code = proc.wait(timeout=timeout)
    wait_for(lambda: not group_members(proc.pid), timeout=60, interval=0.05)
    return code


def group_members(pgid: int) -> dict[int, list[str]]:
    """The live (not zombie) processes of process group ``pgid``, with their command lines."""
    members = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members[int(stat.parent.name)] = [part.decode() for part in command if part][1:]
    return members
