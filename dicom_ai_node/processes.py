"""What the supervisor of ``serve`` knows of its processes, shared with them through a file.

The supervisor (:mod:`dicom_ai_node.supervisor`) rewrites ``<data_dir>/run/<node>/
processes.json`` whenever a child starts or dies; the ``web`` process reads it for
``/healthz`` and ``/metrics``. The folder is the node's own (the data folder may be shared by
the hosts of a cluster) and also holds the node's Prometheus multiprocess files
(``metrics/``), so that ``/metrics`` counts what every process of the node did.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChildState:
    """One process slot of a role: the process in it now, and its history."""

    role: str
    slot: int
    pid: int | None
    running: bool
    ready: bool = False
    restarts: int = 0
    last_exit: str = ""

    @property
    def name(self) -> str:
        return f"{self.role}-{self.slot}"


class ProcessStatus:
    """The node's process status file, in its run folder under ``data_dir``."""

    def __init__(self, data_dir: Path, node_name: str) -> None:
        self.folder = data_dir / "run" / node_name
        self.path = self.folder / "processes.json"

    @property
    def metrics_dir(self) -> Path:
        """Where the node's processes keep their Prometheus values (multiprocess mode)."""
        return self.folder / "metrics"

    def write(self, children: list[ChildState]) -> None:
        """Replace the file atomically, so a reader never sees half of it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps([asdict(child) for child in children]))
        partial.replace(self.path)

    def read(self) -> list[ChildState]:
        """The children as last written; empty if the supervisor has written nothing."""
        try:
            entries = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        return [ChildState(**entry) for entry in entries]

    def problems(self) -> list[str]:
        """The processes that are down, for ``/healthz`` (nothing = all are running)."""
        children = self.read()
        if not children:
            return ["the supervisor has not reported its processes"]
        problems = []
        for child in children:
            if not child.running:
                problems.append(
                    f"process {child.name} is down ({child.last_exit or 'not started'}; "
                    f"restarted {child.restarts} times)"
                )
            elif not child.ready:
                problems.append(f"process {child.name} is starting")
        return problems
