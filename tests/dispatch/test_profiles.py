"""Per-destination output profiles: each destination gets the result kinds it lists."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.config import DestinationSettings
from dicom_ai_node.dispatch.deliveries import plan_deliveries
from dicom_ai_node.jobs.models import Delivery, Result
from tests.support.joblog import job_with_results


def test_each_destination_gets_the_kinds_it_lists(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        job, results = job_with_results(
            session, ["pacs", "legacy", "air", "outbox"], ("sr", "sc", "kos")
        )
        profiles = {"legacy": ["sc"], "air": ["sr", "kos"]}  # "pacs" is not named: all
        assert plan_deliveries(session, job, results, profiles) == 3 + 1 + 2
    with sessions() as session:
        rows = session.execute(
            select(Delivery.destination, Result.kind).join(
                Result, Result.sop_instance_uid == Delivery.result_uid
            )
        ).all()
    got: dict[str, set[str]] = {}
    for destination, kind in rows:
        got.setdefault(destination, set()).add(kind)
    assert got == {"pacs": {"sr", "sc", "kos"}, "legacy": {"sc"}, "air": {"sr", "kos"}}


def test_destination_objects_default_and_validation() -> None:
    peer = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    assert DestinationSettings.model_validate(peer).objects == ["sr", "sc", "kos"]
    assert DestinationSettings.model_validate({**peer, "objects": ["sc"]}).objects == ["sc"]
    for bad in ([], ["pdf"]):
        with pytest.raises(ValidationError, match="objects"):
            DestinationSettings.model_validate({**peer, "objects": bad})
