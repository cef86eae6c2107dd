"""Per-destination output profiles: each destination gets the result kinds it lists, and of
the Secondary Captures the one of its layout."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.config import DestinationSettings
from dicom_ai_node.dispatch.deliveries import plan_deliveries
from dicom_ai_node.jobs.models import Delivery, Job, Result
from dicom_ai_node.report import DEFAULT_SC_LAYOUT, ResultObject
from dicom_ai_node.runner import chosen_results, sc_layouts
from tests.support.joblog import job_with_results

PEER = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}


def destination(name: str, **options: Any) -> DestinationSettings:
    return DestinationSettings.model_validate({"name": name, **PEER, **options})


def test_each_destination_gets_the_results_chosen_for_it(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        job, results = job_with_results(
            session, ["pacs", "legacy", "air", "outbox"], ("sr", "sc", "kos")
        )
        sr, sc, kos = (r.sop_instance_uid for r in results)
        chosen = {"legacy": {sc}, "air": {sr, kos}}  # "pacs" is not named: all
        assert plan_deliveries(session, job, results, chosen) == 3 + 1 + 2
    with sessions() as session:
        rows = session.execute(
            select(Delivery.destination, Result.kind).join(
                Result, Result.sop_instance_uid == Delivery.result_uid
            )
        ).all()
    got: dict[str, set[str]] = {}
    for name, kind in rows:
        got.setdefault(name, set()).add(kind)
    assert got == {"pacs": {"sr", "sc", "kos"}, "legacy": {"sc"}, "air": {"sr", "kos"}}


def _object(kind: str, uid: str, layout: str | None = None) -> ResultObject:
    ds = Dataset()
    ds.SOPInstanceUID = uid
    return ResultObject(kind, ds, layout)  # type: ignore[arg-type]


def test_kinds_and_sc_layout_choose_the_objects() -> None:
    objects = [
        _object("sr", "1.1"),
        _object("sc", "1.2", "below"),
        _object("sc", "1.3", "above"),
        _object("kos", "1.4"),
    ]
    destinations = [
        destination("pacs"),  # all kinds, default layout
        destination("legacy", objects=["sc"], sc_layout="above"),
        destination("air", objects=["sr", "kos"], sc_layout="above"),
    ]
    assert chosen_results(destinations, objects) == {
        "pacs": {"1.1", "1.2", "1.4"},
        "legacy": {"1.3"},
        "air": {"1.1", "1.4"},
    }


def test_only_the_layouts_the_jobs_destinations_need_are_built() -> None:
    destinations = [
        destination("a", sc_layout="above"),
        destination("b"),
        destination("c", sc_layout="above"),
        destination("d", sc_layout="overlay", objects=["sr"]),  # gets no SC
        destination("e", sc_layout="overlay"),
    ]

    def layouts(*names: str) -> list[str]:
        return list(sc_layouts(destinations, Job(destinations=list(names))))

    assert layouts("a", "b", "c", "d") == ["above", "below"]
    assert layouts("c", "e") == ["above", "overlay"]
    # no destination that takes an SC: the outbox copy in the default layout
    assert layouts("d", "outbox") == layouts("outbox") == [DEFAULT_SC_LAYOUT]


def test_destination_profile_defaults_and_validation() -> None:
    pacs = destination("pacs")
    assert pacs.objects == ["sr", "sc", "kos"]
    assert pacs.sc_layout == DEFAULT_SC_LAYOUT == "below"
    assert destination("pacs", objects=["sc"]).objects == ["sc"]
    assert destination("pacs", sc_layout="overlay").sc_layout == "overlay"
    for bad in ([], ["pdf"]):
        with pytest.raises(ValidationError, match="objects"):
            destination("pacs", objects=bad)
    with pytest.raises(ValidationError, match="sc_layout"):
        destination("pacs", sc_layout="left")
