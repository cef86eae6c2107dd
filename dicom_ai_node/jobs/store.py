"""Small write helpers shared by every stage: portable upserts and the event log."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from dicom_ai_node.jobs.models import Event


def upsert_for(dialect: str, model: type[Any]) -> Any:
    """The dialect's INSERT that supports ON CONFLICT (SQLite and PostgreSQL alike)."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(model)


def upsert(session: Session, model: type[Any]) -> Any:
    """:func:`upsert_for` the dialect of ``session``."""
    return upsert_for(session.get_bind().dialect.name, model)


def add_event(
    session: Session | Connection,
    kind: str,
    message: str = "",
    *,
    job_id: int | None = None,
    study: str | None = None,
    series: str | None = None,
    association_id: str | None = None,
    **data: Any,
) -> None:
    """Append one event to the log (in the caller's transaction)."""
    session.execute(
        insert(Event).values(
            kind=kind,
            message=message,
            job_id=job_id,
            study_instance_uid=study,
            series_instance_uid=series,
            association_id=association_id,
            data=data,
        )
    )
