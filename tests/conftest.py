"""Shared fixtures: settings in a temporary folder and nodes running in-process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.config import Settings
from dicom_ai_node.jobs.db import create_db_engine, session_factory, upgrade
from dicom_ai_node.node import Node
from tests.support.helpers import ROOT, make_settings
from tests.support.joblog import JobLog


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A migrated SQLite job log in ``tmp_path``."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    upgrade(engine)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def job_log(sessions: sessionmaker[Session], tmp_path: Path) -> JobLog:
    """Helpers that fill the job log of ``sessions`` (web and notify tests)."""
    return JobLog(sessions, tmp_path)


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Settings]:
    return lambda **overrides: make_settings(tmp_path, **overrides)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start in-process nodes (stopped at teardown)."""
    nodes: list[Node] = []

    def start(models: dict[str, Any] | None = None, **overrides: Any) -> Node:
        node = Node(make_settings(tmp_path, **overrides), models=models if models else {})
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture(scope="session")
def demo_models() -> dict[str, Any]:
    """The bundled demo models, loaded once for the whole run (TensorFlow is slow to start)."""
    from dicom_ai_node.infer.runtime import LoadedModel, read_cards

    return {name: LoadedModel(package, card=card) for name, (package, card) in read_cards().items()}


@pytest.fixture(scope="session")
def shipped_routes() -> list[dict[str, Any]]:
    """The routes of ``config/node.toml`` as shipped."""
    import tomllib

    with (ROOT / "config" / "node.toml").open("rb") as f:
        routes: list[dict[str, Any]] = tomllib.load(f)["routes"]
    return routes


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Under ``-m`` (``make test-fast``), say how many tests were left to ``make test``."""
    deselected = len(terminalreporter.stats.get("deselected", []))
    if config.getoption("markexpr") and deselected:
        terminalreporter.write_line(
            f"{deselected} tests (marked peers or slow) were left to `make test`, "
            "which runs everything"
        )
