"""A `dicom-ai-node serve` process, as operators run it, for the process-level suites."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from sqlalchemy import Engine

from dicom_ai_node.jobs.db import create_db_engine, read_only
from tests.support.helpers import ROOT, free_port, wait_for


class Served:
    """A `dicom-ai-node serve` process on a free port with its data in a folder."""

    def __init__(self, tmp_path: Path, config: Path | None = None) -> None:
        self.port = free_port()
        self.data = tmp_path / "var"
        self.env = {
            **os.environ,
            "DICOM_AI_NODE_DICOM__BIND": "127.0.0.1",
            "DICOM_AI_NODE_DICOM__PORT": str(self.port),
            "DICOM_AI_NODE_HTTP__PORT": "0",
            "DICOM_AI_NODE_STORAGE__DATA_DIR": str(self.data),
            "DICOM_AI_NODE_STORAGE__MIN_FREE_MB": "0",
            "DICOM_AI_NODE_ASSEMBLE__STABLE_SECONDS": "0.5",
            "DICOM_AI_NODE_WORKER__LEASE_SECONDS": "5",
        }
        if config is not None:
            self.env["DICOM_AI_NODE_CONFIG"] = str(config)
        self.log = tmp_path / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> None:
        """Start ``serve``; with ``wait``, return once it listens (failing if it exits)."""
        if self.proc is not None and self.proc.poll() is None:
            raise AssertionError("serve is running already; stop it first (it would leak)")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_ai_node", "serve"],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        if not wait:
            return

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited: {self.log.read_text()}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, timeout=90, interval=0.1)

    def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self.proc = None
        return code

    def engine(self) -> Engine:
        return read_only(create_db_engine(f"sqlite:///{self.data / 'jobs.sqlite'}"))
