"""Fixtures of the cross-cutting suites: a PostgreSQL job log."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.jobs.db import session_factory
from tests.support.postgres import empty_job_log, postgres_server


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A database on a PostgreSQL cluster of its own, for the module's tests."""
    with postgres_server() as url:
        yield url


@pytest.fixture
def pg_sessions(postgres_url: str) -> Iterator[sessionmaker[Session]]:
    """The module's PostgreSQL job log, emptied and migrated for each test."""
    engine = empty_job_log(postgres_url)
    yield session_factory(engine)
    engine.dispose()
