"""The node: wires the stages together around the job log and owns start and stop.

Threads of one process: the DICOM listener (pynetdicom, one thread per association), the
assembler (completes series and studies, routes them to jobs), the worker (claims jobs and
hands each to the job runner: inference, then the result objects, written to the outbox),
one dispatcher per destination, the notifier, the heartbeat and the web server. Each reads
and writes the job log, so a restart resumes where it stopped. See docs/architecture.md.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import text

from dicom_ai_node import __version__
from dicom_ai_node.assemble.loop import Assembler
from dicom_ai_node.audit.messages import MINOR_FAILURE, SUCCESS, Peer, transferred_event
from dicom_ai_node.audit.trail import AuditTrail
from dicom_ai_node.config import ConfigError, Settings
from dicom_ai_node.dispatch.commitment import CommitmentReports
from dicom_ai_node.dispatch.deliveries import Dispatcher, release_leases
from dicom_ai_node.dispatch.scu import SendOutcome
from dicom_ai_node.jobs.crashes import CrashRecords, summary
from dicom_ai_node.jobs.db import create_db_engine, read_only, session_factory, upgrade
from dicom_ai_node.jobs.models import utcnow
from dicom_ai_node.jobs.nodes import (
    Heartbeat,
    close_associations,
    dead_nodes,
    heartbeat,
    live_peers,
)
from dicom_ai_node.jobs.queue import AttemptLimits, recover, worker_id
from dicom_ai_node.jobs.worker import Worker
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.notify import Notifier
from dicom_ai_node.receive.record import reindex
from dicom_ai_node.receive.scp import StorageSCP
from dicom_ai_node.retrieve import Sources
from dicom_ai_node.runner import JobRunner
from dicom_ai_node.spool import Spool
from dicom_ai_node.web.server import HttpServer

if TYPE_CHECKING:
    from dicom_ai_node.infer.evaluation import ExpectedRate
    from dicom_ai_node.infer.runtime import LoadedModel

log = logging.getLogger(__name__)

AUDITED_TAGS = ["StudyInstanceUID", "PatientID", "SOPClassUID"]


class Node:
    """A running node. ``start()`` returns once it listens; ``stop()`` shuts it down cleanly.

    ``models`` maps model names to loaded models; by default the models the routes name are
    loaded from the bundled packages and ``[models] dirs``.
    """

    def __init__(self, settings: Settings, models: dict[str, LoadedModel] | None = None) -> None:
        self.settings = settings
        self.owner = worker_id(settings.node_name)
        self.engine = create_db_engine(settings.database_url, settings.database.busy_timeout_ms)
        self.sessions = session_factory(self.engine)
        self.read_sessions = session_factory(read_only(self.engine))
        self.spool = Spool(settings.storage.data_dir, settings.node_name)
        self.metrics = NodeMetrics(self.read_sessions, settings.cluster.node_timeout_seconds)
        self.audit = AuditTrail(
            self.sessions, settings.audit, settings.node_name, self.metrics.audit_message
        )
        self.crashes = CrashRecords(settings.storage.data_dir)
        self.limits = AttemptLimits(settings.worker.max_attempts, settings.worker.max_interruptions)
        self.models = models if models is not None else self._load_models()
        self.metrics.expected.update(self._expected_rates())
        extra = tuple(
            sorted({key for route in settings.routes for key in route.where} - {"CallingAETitle"})
        )
        self.scp = StorageSCP(
            settings.dicom,
            self.spool,
            self.sessions,
            settings.node_name,
            min_free_bytes=settings.storage.min_free_mb * 1024 * 1024,
            extra_keywords=extra,
            metrics=self.metrics,
            audit=self.audit,
            commitment_reports=CommitmentReports(self.sessions, settings.dispatch).handle,
        )
        self.runner = JobRunner(
            settings,
            self.sessions,
            self.read_sessions,
            self.spool,
            self.models,
            self.owner,
            self.metrics,
            on_results=self._results_written,
            audit=self.audit,
        )
        self.worker = Worker(
            self.sessions,
            self.runner.process_job,
            self.owner,
            lease_seconds=settings.worker.lease_seconds,
            limits=self.limits,
            crashes=self.crashes,
            poll_seconds=settings.worker.poll_seconds,
        )
        self.dispatcher = Dispatcher(
            self.sessions,
            settings.destinations,
            settings.dispatch,
            settings.dicom.ae_title,
            self.owner,
            self.spool,
            on_outcome=self._dispatched,
            on_delivered=lambda seconds: self.metrics.end_to_end_seconds(seconds, "delivered"),
        )
        sources = Sources(
            tuple(settings.sources),
            frozenset(route.name for route in settings.routes),
            settings.dicom.ae_title,
            self.scp.ingest,
            self.audit,
        )
        self.http = HttpServer(
            self.sessions,
            read_sessions=self.read_sessions,
            metrics=self.metrics,
            health=self.health,
            bind=settings.http.bind,
            port=settings.http.port,
            token=settings.http.token,
            destinations=settings.destinations,
            node_name=settings.node_name,
            data_dir=settings.storage.data_dir,
            audit=self.audit,
            ingest=self.scp.ingest,
            stow_max_bytes=int(settings.http.stow_max_mb * 2**20),
            sources=sources,
            node_timeout_seconds=settings.cluster.node_timeout_seconds,
        )
        self.notifier = Notifier(
            self.sessions,
            settings.notifications,
            owner=self.owner,
            node_name=settings.node_name,
            dashboard_url=settings.http.public_url,
            metrics=self.metrics,
        )
        self.assembler = Assembler(
            self.sessions,
            settings.routes,
            settings.assemble,
            self.spool,
            retention_days=settings.storage.retention_days,
            on_queued=self.worker.wake,
            fetch_missing=sources.fetch_missing,
        )
        self._reindex_before: float | None = None
        self.heartbeat = Heartbeat(
            self.sessions, settings.node_name, __version__, settings.cluster, self._reindex_late
        )

    def _load_models(self) -> dict[str, LoadedModel]:
        """Load the models the routes name (each once), refusing unknown or broken ones."""
        from dicom_ai_node.infer.runtime import LoadedModel, ModelPackageError, read_cards

        if not self.settings.routes:
            return {}
        try:
            cards = read_cards(self.settings.models.dirs)
        except (ModelPackageError, OSError, ValueError) as exc:
            raise ConfigError(f"models: {exc}") from None
        for i, route in enumerate(self.settings.routes):
            if route.model not in cards:
                raise ConfigError(
                    f"routes[{i}].model: no model package named {route.model!r} "
                    f"(found: {', '.join(sorted(cards)) or 'none'})"
                )
        models = {}
        for name in sorted({route.model for route in self.settings.routes}):
            package, card = cards[name]
            try:
                models[name] = LoadedModel(package, card=card)
            except ModelPackageError as exc:
                raise ConfigError(f"models: {exc}") from None
            log.info("model %s %s loaded from %s", card.name, card.version, package)
        return models

    def _expected_rates(self) -> dict[str, ExpectedRate]:
        """Per loaded model, the positive rate its package's evaluation leads to expect."""
        from dicom_ai_node.infer.evaluation import expected_positive_rate

        rates = {}
        for name, model in self.models.items():
            expected = expected_positive_rate(model.package, model.card)
            if expected is not None:
                rates[name] = expected
        return rates

    def _check_model_identities(self) -> None:
        """Refuse a model whose weights differ from those the job log recorded for the same
        name and version: new weights need a new version, or results could not be traced."""
        from dicom_ai_node.jobs.queue import recorded_weights

        with self.read_sessions() as session:
            for model in self.models.values():
                card = model.card
                other = recorded_weights(session, card.name, card.version) - {model.weights_sha256}
                if other:
                    raise ConfigError(
                        f"models: model package {card.name} ({model.package}): version "
                        f"{card.version} has weights sha256 {model.weights_sha256}, but earlier "
                        f"jobs of that version ran weights {', '.join(sorted(other))}; "
                        "give changed weights a new version in model.toml"
                    )

    # --- start and stop --------------------------------------------------------------------

    def start(self) -> None:
        """Migrate the job log, recover from a previous run, start every stage.

        Recovery touches what this node left and what dead nodes left (their associations,
        their partial files), never what a live node of the cluster is working on: with live
        peers, spool files written in the last ``node_timeout_seconds`` are re-indexed only
        once that time has passed (:meth:`_reindex_late`), by when their rows are committed.
        """
        name = self.settings.node_name
        timeout = self.settings.cluster.node_timeout_seconds
        upgrade(self.engine)
        self._check_model_identities()
        with self.sessions.begin() as session:
            heartbeat(session, name, __version__, started=True)
        with self.sessions.begin() as session:
            dead = dead_nodes(session, timeout)
            peers = live_peers(session, name, timeout)
            lost = close_associations(session, [name, *dead])
            requeued = recover(session, name, self.crashes.of, self.limits)
            release_leases(session, name)
        for owner in set(requeued.values()):
            crash = self.crashes.of(owner)
            if crash is not None:
                log.warning("worker %s had crashed: %s\n%s", owner, summary(crash), crash)
            self.crashes.forget(owner)
        cleaned = self.spool.clean_temporary(dead)
        now = time.time()
        self._reindex_before = now if peers else None
        reindexed = reindex(self.sessions, self.spool, now - timeout if peers else None)
        if lost or requeued or cleaned or reindexed:
            log.warning(
                "recovered from an unclean stop: %d associations closed, jobs %s judged, "
                "%d partial files removed, %d spool files re-indexed",
                lost,
                sorted(requeued),
                cleaned,
                reindexed,
            )
        self.audit.start()
        self.scp.start()
        self.heartbeat.start()
        self.assembler.start()
        self.worker.start()
        self.dispatcher.start()
        self.http.start()
        self.notifier.start()

    def _reindex_late(self) -> None:
        """The re-index deferred at start: files written before the start, whatever their age."""
        if self._reindex_before is None:
            return
        added = reindex(self.sessions, self.spool, self._reindex_before)
        if added:
            log.warning("recovered from an unclean stop: %d spool files re-indexed", added)

    def _results_written(self, deliveries: int) -> None:
        self.notifier.wake()
        if deliveries:
            self.dispatcher.wake()

    def _dispatched(self, name: str, outcome: SendOutcome) -> None:
        """Count a C-STORE of a result and audit it (PS3.15 A.5.3.4, instances sent)."""
        self.metrics.dispatch_attempt(name, outcome.ok)
        destination = next(d for d in self.settings.destinations if d.name == name)
        try:
            ds = dcmread(outcome.path, stop_before_pixels=True, specific_tags=AUDITED_TAGS)
        except (OSError, InvalidDicomError) as exc:
            log.warning("audit: cannot read %s: %s", outcome.path, exc)
            return
        self.audit.record(
            transferred_event(
                Peer(self.settings.dicom.ae_title, self.settings.dicom.bind),
                Peer(destination.ae_title, destination.host),
                str(ds.get("StudyInstanceUID", "")),
                str(ds.get("PatientID", "")),
                {str(ds.get("SOPClassUID", "")): 1},
                utcnow(),
                received=False,
                outcome=SUCCESS if outcome.ok else MINOR_FAILURE,
            )
        )

    def health(self) -> list[str]:
        """What is wrong with the node (nothing = healthy), for ``/healthz``."""
        problems = [] if self.scp.listening else ["the DICOM listener is not listening"]
        try:
            with self.read_sessions() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:
            problems.append(f"job log: {type(exc).__name__}: {exc}")
        missing = {route.model for route in self.settings.routes} - set(self.models)
        if missing:
            problems.append(f"models not loaded: {', '.join(sorted(missing))}")
        if not self.scp.space_left():
            problems.append(
                f"spool below its free-space floor ({self.settings.storage.min_free_mb} MB): "
                "refusing new instances"
            )
        return problems

    def stop(self) -> None:
        """Stop accepting, let in-flight associations finish, stop the stages."""
        self.http.stop()
        self.scp.stop()
        self.assembler.stop()
        self.heartbeat.stop()
        self.worker.stop()
        self.dispatcher.stop()
        self.notifier.stop()
        self.audit.stop()
        self.engine.dispose()
