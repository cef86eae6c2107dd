"""A `dicom-ai-node serve` process, as operators run it, for the process-level suites."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from sqlalchemy import Engine

from dicom_ai_node.jobs.db import create_db_engine, read_only
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
        self.bind = bind
        self.data = data_dir or tmp_path / "var"
        self.database_url = database_url or f"sqlite:///{self.data / 'jobs.sqlite'}"
        self.env = {
            **os.environ,
            "DICOM_AI_NODE_DICOM__BIND": bind,
            "DICOM_AI_NODE_DICOM__PORT": str(self.port),
            "DICOM_AI_NODE_HTTP__BIND": bind,
            "DICOM_AI_NODE_HTTP__PORT": "0",
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
        self.log = tmp_path / f"{node_name or 'serve'}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> None:
        """Start ``serve``; with ``wait``, return once it listens (failing if it exits).

        It runs in a session (and process group) of its own, so that :meth:`kill` ends it
        with every process it started.
        """
        if self.proc is not None and self.proc.poll() is None:
            raise AssertionError("serve is running already; stop it first (it would leak)")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_ai_node", "serve"],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_listening()

    def wait_listening(self, timeout: float = 90) -> None:
        """Return once ``serve`` accepts DICOM connections; fail if it exits first."""

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited: {self.log.read_text()}")
            with socket.socket() as s:
                return s.connect_ex((self.bind, self.port)) == 0

        wait_for(listening, timeout=timeout, interval=0.1)

    def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self.proc = None
        return code

    def kill(self) -> int:
        """SIGKILL the whole process group (``serve`` and any child it started), as a host
        that is lost; returns the exit code of ``serve``. Nothing of it is left running."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait(timeout=60)
        self.proc = None
        return code

    def engine(self) -> Engine:
        return read_only(create_db_engine(self.database_url))
