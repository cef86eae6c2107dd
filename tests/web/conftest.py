"""Fixtures: a real job log in tmp_path and HTTP servers over loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.config import DestinationSettings
from dicom_ai_node.jobs.db import read_only, session_factory
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.web.server import HttpServer
from tests.support.joblog import TOKEN, Running


@pytest.fixture
def serve(sessions: sessionmaker[Session]) -> Iterator[Callable[..., Running]]:
    """Start HTTP servers on free loopback ports over the job log (stopped at teardown).

    The health check reports the running server's ``problems`` list, which tests change.
    """
    servers: list[HttpServer] = []

    def start(**overrides: Any) -> Running:
        problems: list[str] = []
        reads = session_factory(read_only(sessions.kw["bind"]))
        options: dict[str, Any] = {
            "metrics": NodeMetrics(reads),
            "health": lambda: list(problems),
            "bind": "127.0.0.1",
            "port": 0,
            "token": TOKEN,
            "node_name": "test-node",
            "destinations": [
                DestinationSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=11112)
            ],
            **overrides,
        }
        server = HttpServer(sessions, read_sessions=reads, **options)
        server.start()
        servers.append(server)
        return Running(server, problems)

    yield start
    for server in servers:
        server.stop()
