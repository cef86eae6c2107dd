"""Small write helpers shared by every stage: portable upserts and the event log."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from dicom_ai_node.jobs.models import Event


def upsert(session: Session, model: type[Any]) -> Any:
    """The dialect's INSERT that supports ON CONFLICT (SQLite and PostgreSQL alike)."""
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(model)


def add_event(
    session: Session,
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
    session.add(
        Event(
            kind=kind,
            message=message,
            job_id=job_id,
            study_instance_uid=study,
            series_instance_uid=series,
            association_id=association_id,
            data=data,
        )
    )
