"""retrieve: pull studies from a PACS (Query/Retrieve SCU, PS3.4 Annex C; Study Root).

:meth:`Retriever.find` asks a configured ``[[sources]]`` PACS for studies (C-FIND at STUDY
level by Study Instance UID, or by Study Date range and Modalities in Study);
:meth:`Retriever.retrieve` fetches one study (or one of its series):

- ``retrieve = "move"``: C-MOVE to the node's own AE title; the PACS opens its own
  association to the node's listener, so the instances go through the normal C-STORE path.
- ``retrieve = "get"``: C-GET; the PACS sends the instances back on our association
  (PS3.4 C.4.3) and each is stored through the same :class:`~dicom_ai_node.receive.ingest.Ingest`
  as a C-STORE.

Either way durability, duplicates and the job log apply, and the assembler completes what
arrives like anything pushed; its series are routed by the requested route only
(``requested_routes``). :func:`retrieve_studies` retrieves several studies
with at most ``max_associations`` at once, paces them to ``max_instances_per_second`` and
records each in the job log. :func:`fetch_missing` compares what the source holds of a study
(C-FIND at SERIES level) with what the node holds and retrieves the missing series, for
study-level routes with ``fetch_missing``.

With an :class:`~dicom_ai_node.audit.trail.AuditTrail`, each C-FIND is audited as a Query
(PS3.15 A.5.3.10) and what a C-GET brought as DICOM Instances Transferred (A.5.3.4); what a
C-MOVE brings arrives on the listener's own associations, which audit it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import Engine, select

from dicom_ai_node.audit.messages import (
    SERIOUS_FAILURE,
    SUCCESS,
    Peer,
    ReceivedTally,
    query_event,
)
from dicom_ai_node.audit.trail import AuditTrail
from dicom_ai_node.config import SourceSettings
from dicom_ai_node.jobs.models import Event, RequestedRoute, utcnow
from dicom_ai_node.jobs.store import add_event, upsert_for
from dicom_ai_node.receive.ingest import Ingest
from dicom_ai_node.tls import peer_context

log = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)
_GET_STORAGE_CONTEXTS = 127  # with the C-GET context: pynetdicom's (and PS3.8's) 128 at most


class RetrieveError(RuntimeError):
    """The source cannot be reached or refused the query; the message says why."""


@dataclass(frozen=True)
class StudyMatch:
    """A study the source holds (C-FIND response identifier, PS3.4 C.6.2.1.2)."""

    study_instance_uid: str
    patient_id: str = ""
    study_date: str = ""
    modalities: tuple[str, ...] = ()
    instances: int | None = None


@dataclass(frozen=True)
class Retrieved:
    """The outcome of retrieving one study: the final C-MOVE/C-GET status and its
    sub-operation counts (PS3.4 C.4.2.1.5, C.4.3.1.5); ``error`` says why it failed."""

    study_instance_uid: str
    status: int | None
    completed: int = 0
    failed: int = 0
    warning: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 0x0000


Progress = Callable[[str, int, int], None]  # (study UID, done, total) while it runs


def _count(ds: Dataset | None, keyword: str) -> int:
    value = ds.get(keyword) if ds is not None else None
    return 0 if value is None or value == "" else int(value)


def _match(identifier: Dataset) -> StudyMatch:
    modalities = identifier.get("ModalitiesInStudy") or []
    if isinstance(modalities, str):
        modalities = [modalities]
    instances = identifier.get("NumberOfStudyRelatedInstances")
    return StudyMatch(
        study_instance_uid=str(identifier.StudyInstanceUID),
        patient_id=str(identifier.get("PatientID", "") or ""),
        study_date=str(identifier.get("StudyDate", "") or ""),
        modalities=tuple(str(m) for m in modalities),
        instances=int(instances) if instances not in (None, "") else None,
    )


def study_query(
    study_instance_uid: str | None = None, since: date | None = None, modality: str | None = None
) -> Dataset:
    """A STUDY level C-FIND identifier (PS3.4 C.6.2.1): a Study Instance UID, or a Study Date
    range from ``since`` and Modalities in Study."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_instance_uid or ""
    ds.StudyDate = f"{since:%Y%m%d}-" if since else ""
    ds.ModalitiesInStudy = modality or ""
    ds.PatientID = ""
    ds.NumberOfStudyRelatedInstances = ""
    return ds


def _encoded(identifier: Dataset) -> bytes:
    """A C-FIND identifier as sent on the wire (Explicit VR Little Endian), for the audit."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, identifier)
    return buffer.getvalue()


class Retriever:
    """Queries and retrieves from one source as ``calling_ae_title`` (the node's AE title,
    which is also the C-MOVE destination). ``ingest`` stores what C-GET brings; ``audit``
    records the queries and what C-GET brought."""

    def __init__(
        self,
        source: SourceSettings,
        calling_ae_title: str,
        ingest: Ingest | None = None,
        audit: AuditTrail | None = None,
    ) -> None:
        if source.retrieve == "get" and ingest is None:
            raise ValueError("C-GET needs an Ingest to store into")
        self.source = source
        self.calling_ae_title = calling_ae_title
        self.ingest = ingest
        self.audit = audit
        self._tls = peer_context(source, "sources")
        self._peer = Peer(source.ae_title, source.host)
        self._lock = threading.Lock()
        self._got = ReceivedTally()  # what C-GET stored, for the audit

    def _associate(self, ae: AE, **kwargs: Any) -> Association:
        s = self.source
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 30
        ae.dimse_timeout = s.timeout
        tls_args = (self._tls, s.server_name or s.host) if self._tls else None
        assoc = ae.associate(s.host, s.port, ae_title=s.ae_title, tls_args=tls_args, **kwargs)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "failed or was aborted"
            raise RetrieveError(f"association with {s.ae_title}@{s.host}:{s.port} {why}")
        return assoc

    def find(
        self,
        study_instance_uid: str | None = None,
        since: date | None = None,
        modality: str | None = None,
    ) -> list[StudyMatch]:
        """The studies the source holds that match (C-FIND, Study Root, STUDY level)."""
        return [_match(i) for i in self._c_find(study_query(study_instance_uid, since, modality))]

    def find_series(self, study_instance_uid: str) -> dict[str, int | None]:
        """The series the source holds of a study, with their Number of Series Related
        Instances when it gives it (C-FIND at SERIES level, PS3.4 C.6.2.1.2)."""
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_instance_uid
        query.SeriesInstanceUID = ""
        query.NumberOfSeriesRelatedInstances = ""
        return {
            str(i.SeriesInstanceUID): _count(i, "NumberOfSeriesRelatedInstances") or None
            for i in self._c_find(query)
            if i.get("SeriesInstanceUID")
        }

    def _c_find(self, query: Dataset) -> list[Dataset]:
        """The identifiers of a Study Root C-FIND's pending responses; raises
        :class:`RetrieveError`."""
        ae = AE(ae_title=self.calling_ae_title)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae)
        found: list[Dataset] = []
        outcome = SERIOUS_FAILURE
        try:
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            ):
                if "Status" not in status:
                    raise RetrieveError("no C-FIND answer: the source aborted or timed out")
                code = int(status.Status)
                if code in _PENDING and identifier is not None:
                    found.append(identifier)
                elif code != 0x0000:
                    raise RetrieveError(f"C-FIND answered {_hex(code)}")
            outcome = SUCCESS
        finally:
            if assoc.is_established:
                assoc.release()
            if self.audit is not None:
                self.audit.record(
                    query_event(
                        Peer(self.calling_ae_title, ""),
                        self._peer,
                        str(StudyRootQueryRetrieveInformationModelFind),
                        _encoded(query),
                        str(ExplicitVRLittleEndian),
                        utcnow(),
                        outcome,
                    )
                )
        return found

    def retrieve(
        self,
        study_instance_uid: str,
        on_progress: Progress | None = None,
        series_instance_uid: str | None = None,
    ) -> Retrieved:
        """Fetch one study, or one series of it, by C-MOVE or C-GET (per the source's
        ``retrieve``)."""
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES" if series_instance_uid else "STUDY"
        query.StudyInstanceUID = study_instance_uid
        if series_instance_uid:
            query.SeriesInstanceUID = series_instance_uid
        ae = AE(ae_title=self.calling_ae_title)
        handlers: list[Any] = []
        if self.source.retrieve == "move":
            model = StudyRootQueryRetrieveInformationModelMove
            ae.add_requested_context(model)
            roles = []
        else:
            model = StudyRootQueryRetrieveInformationModelGet
            ae.add_requested_context(model)
            classes = [
                str(cx.abstract_syntax)
                for cx in StoragePresentationContexts[:_GET_STORAGE_CONTEXTS]
            ]
            for sop_class in classes:
                ae.add_requested_context(sop_class)
            roles = [build_role(sop_class, scp_role=True) for sop_class in classes]
            handlers = [(evt.EVT_C_STORE, self._on_store)]
        try:
            assoc = self._associate(ae, ext_neg=roles, evt_handlers=handlers)
        except RetrieveError as exc:
            return Retrieved(study_instance_uid, None, error=str(exc))
        last: Dataset | None = None
        try:
            if self.source.retrieve == "move":
                responses = assoc.send_c_move(query, self.calling_ae_title, model)
            else:
                responses = assoc.send_c_get(query, model)
            for status, _identifier in responses:
                if "Status" not in status:
                    continue  # no response within the DIMSE timeout: the loop ends
                last = status
                if on_progress is not None and int(status.Status) in _PENDING:
                    done = sum(
                        _count(status, f"NumberOf{kind}Suboperations")
                        for kind in ("Completed", "Failed", "Warning")
                    )
                    on_progress(
                        study_instance_uid,
                        done,
                        done + _count(status, "NumberOfRemainingSuboperations"),
                    )
        finally:
            if assoc.is_established:
                assoc.release()
            self._audit_got(study_instance_uid)
        if last is None:
            why = "aborted the association" if assoc.is_aborted else "did not answer"
            return Retrieved(
                study_instance_uid,
                None,
                error=f"no final status: the source {why} (does it know "
                f"{self.calling_ae_title} as a move destination?)",
            )
        code = int(last.Status)
        return Retrieved(
            study_instance_uid,
            code,
            completed=_count(last, "NumberOfCompletedSuboperations"),
            failed=_count(last, "NumberOfFailedSuboperations"),
            warning=_count(last, "NumberOfWarningSuboperations"),
            error=""
            if code == 0
            else f"C-{self.source.retrieve.upper()} answered {_hex(code)} "
            f"{last.get('ErrorComment', '')}".strip(),
        )

    def _on_store(self, event: evt.Event) -> int | Dataset:
        """A C-STORE sub-operation of a C-GET: stored like any C-STORE."""
        assert self.ingest is not None
        stored = self.ingest.store(
            event.encoded_dataset(),
            association_id=None,
            calling_ae_title=self.source.ae_title,
            transfer_syntax_uid=str(event.context.transfer_syntax),
        )
        if stored.ok:
            if stored.header is not None:
                header = stored.header
                with self._lock:
                    self._got.add(
                        header.study_instance_uid, header.patient_id, header.sop_class_uid
                    )
            return 0x0000
        status = Dataset()
        status.Status = stored.status
        status.ErrorComment = stored.reason[:64]
        return status

    def _audit_got(self, study_instance_uid: str) -> None:
        """Audit the instances of the study a C-GET brought (A.5.3.4: the node received them)."""
        node = Peer(self.calling_ae_title, "")
        with self._lock:
            events = self._got.events(self._peer, node, utcnow(), only=study_instance_uid)
        if self.audit is not None:
            for event in events:
                self.audit.record(event)


def _hex(code: int | None) -> str:
    return "no status" if code is None else f"0x{code:04X}"


class Pace:
    """Spaces retrievals so that, on average, at most ``rate`` instances per second come in
    (0 = no limit): after a study of n instances, the next may start n / rate seconds after
    it started."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self, instances: int) -> None:
        if not self.rate:
            return
        with self._lock:
            start = max(self._next, time.monotonic())
            self._next = start + instances / self.rate
        time.sleep(max(0.0, start - time.monotonic()))


def request_route(engine: Engine, study_instance_uid: str, route: str) -> None:
    """Record that ``route`` (only) is to run on the study once it is in (before the
    retrieve, so that its first series to complete already knows)."""
    insert = upsert_for(engine.dialect.name, RequestedRoute).values(
        study_instance_uid=study_instance_uid, route=route, requested_at=utcnow()
    )
    with engine.begin() as connection:
        connection.execute(insert.on_conflict_do_nothing())


def retrieve_studies(
    retriever: Retriever,
    studies: Sequence[StudyMatch],
    route: str,
    engine: Engine,
    on_progress: Progress | None = None,
    on_done: Callable[[Retrieved], None] | None = None,
) -> list[Retrieved]:
    """Retrieve ``studies`` for ``route`` with the source's throttling; each outcome is a
    ``retrieved`` or ``retrieve_failed`` event in the job log. Outcomes in the studies' order."""
    source = retriever.source
    pace = Pace(source.max_instances_per_second)

    def one(study: StudyMatch) -> Retrieved:
        pace.wait(study.instances or 1)
        request_route(engine, study.study_instance_uid, route)
        outcome = retriever.retrieve(study.study_instance_uid, on_progress)
        summary = f"C-{source.retrieve.upper()} from {source.name} for route {route}: " + (
            f"{outcome.completed} instances"
            if outcome.ok
            else f"{outcome.completed} instances, {outcome.failed} failed: {outcome.error}"
        )
        log.info("retrieve %s: %s", study.study_instance_uid, summary)
        try:
            with engine.begin() as connection:
                add_event(
                    connection,
                    "retrieved" if outcome.ok else "retrieve_failed",
                    summary,
                    study=study.study_instance_uid,
                    route=route,
                    source=source.name,
                )
        except Exception:
            log.exception("cannot record a retrieve in the job log")
        if on_done is not None:
            on_done(outcome)
        return outcome

    with ThreadPoolExecutor(source.max_associations, "retrieve") as pool:
        return list(pool.map(one, studies))


def fetch_missing(
    retriever: Retriever, engine: Engine, study_instance_uid: str, held: dict[str, int], route: str
) -> list[str]:
    """Retrieve the series of a study that the source holds more of than the node
    (``held``: instances per series); the series fetched. Once per study: a study fetched
    for before (a ``missing_fetched`` event) is taken as it is. A source that cannot be asked
    is a ``fetch_missing_failed`` event, and the study is taken as it is."""
    source = retriever.source
    with engine.connect() as connection:
        fetched_before = connection.execute(
            select(Event.id).where(
                Event.kind == "missing_fetched", Event.study_instance_uid == study_instance_uid
            )
        ).first()
    if fetched_before is not None:
        return []
    try:
        listed = retriever.find_series(study_instance_uid)
    except RetrieveError as exc:
        _record(engine, "fetch_missing_failed", f"{source.name}: {exc}", study_instance_uid, route)
        return []
    missing = [uid for uid, count in listed.items() if uid not in held or (count or 0) > held[uid]]
    if not missing:
        return []
    outcomes = [retriever.retrieve(study_instance_uid, None, uid) for uid in missing]
    summary = f"C-{source.retrieve.upper()} from {source.name} for route {route}: " + ", ".join(
        f"series {uid} "
        + (f"{o.completed} instances" if o.ok else f"failed ({o.error or _hex(o.status)})")
        for uid, o in zip(missing, outcomes, strict=True)
    )
    log.info("fetch missing %s: %s", study_instance_uid, summary)
    _record(engine, "missing_fetched", summary, study_instance_uid, route, fetched=missing)
    return [uid for uid, o in zip(missing, outcomes, strict=True) if o.ok and o.completed]


def _record(
    engine: Engine, kind: str, summary: str, study: str, route: str, fetched: Sequence[str] = ()
) -> None:
    with engine.begin() as connection:
        add_event(connection, kind, summary, study=study, route=route, fetched=list(fetched))


@dataclass(frozen=True)
class Sources:
    """The configured ``[[sources]]`` and ``routes`` names, pulled into ``ingest`` as the
    node's ``ae_title`` (what ``run`` and ``POST /api/pull`` use)."""

    sources: tuple[SourceSettings, ...]
    routes: frozenset[str]
    ae_title: str
    ingest: Ingest
    audit: AuditTrail | None = None

    def retriever(self, route: str, name: str | None = None) -> Retriever:
        """The retriever of source ``name`` (the first when ``None``) for a known ``route``;
        raises ``LookupError`` naming what is unknown."""
        if route not in self.routes:
            known = ", ".join(sorted(self.routes)) or "none"
            raise LookupError(f"routes: no route named {route!r} (known: {known})")
        if not self.sources:
            raise LookupError("sources: none configured; add a [[sources]] table")
        for source in self.sources:
            if name is None or source.name == name:
                return Retriever(source, self.ae_title, self.ingest, self.audit)
        known = ", ".join(s.name for s in self.sources)
        raise LookupError(f"sources: no source named {name!r} (known: {known})")

    def fetch_missing(
        self, source: str, study_instance_uid: str, held: dict[str, int], route: str
    ) -> list[str]:
        """:func:`fetch_missing` from source ``source`` (the assembler's hook)."""
        retriever = self.retriever(route, source)
        return fetch_missing(retriever, self.ingest.engine, study_instance_uid, held, route)
