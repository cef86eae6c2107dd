"""The node: wires the stages together around the job log and owns start and stop.

The stages are roles (``receive``: the DICOM listener, pynetdicom, one thread per
association; ``work``: the assembler, which completes series and studies and routes them to
jobs, and the worker, which hands each job to the job runner: inference, then the result
objects, written to the outbox; ``dispatch``: one sender per destination; ``notify``; ``web``).
One :class:`Node` runs some or all of them as threads of its process; ``serve`` runs one per
role and process under :mod:`dicom_ai_node.supervisor`. Each reads and writes the job log, so
a restart resumes where it stopped. See docs/architecture.md.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node import __version__
from dicom_ai_node.assemble.loop import Assembler
from dicom_ai_node.audit.messages import MINOR_FAILURE, SUCCESS, Peer, transferred_event
from dicom_ai_node.audit.trail import AuditTrail
from dicom_ai_node.config import ROLES, ConfigError, Role, Settings
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
from dicom_ai_node.processes import ProcessStatus
from dicom_ai_node.receive.ingest import Ingest
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
    """A running node, or the ``roles`` of it that one process runs.

    ``start()`` returns once it listens; ``stop()`` shuts it down cleanly. With every role
    and no ``status`` it is the whole node in one process (the tests, ``demo``) and does the
    node's own duties too: recovery at start and the heartbeat (:class:`NodeDuties`). As a
    child of ``serve``'s supervisor (:mod:`dicom_ai_node.supervisor`) it runs its roles only:
    the supervisor did the duties, ``listener`` is the DICOM socket it opened and ``status``
    reads what it knows of its processes, for ``/healthz`` and ``/metrics``.

    ``models`` maps model names to loaded models; by default, when the node works, the
    models the routes name are loaded from the bundled packages and ``[models] dirs``.
    """

    def __init__(
        self,
        settings: Settings,
        models: dict[str, LoadedModel] | None = None,
        *,
        roles: Collection[Role] = ROLES,
        listener: socket.socket | None = None,
        status: ProcessStatus | None = None,
    ) -> None:
        self.settings = settings
        self.roles = frozenset(roles)
        self.status = status
        self.owner = worker_id(settings.node_name)
        self.engine = create_db_engine(settings.database_url, settings.database.busy_timeout_ms)
        self.sessions = session_factory(self.engine)
        self.read_sessions = session_factory(read_only(self.engine))
        self.spool = Spool(settings.storage.data_dir, settings.node_name)
        self.metrics = NodeMetrics(
            self.read_sessions, settings.cluster.node_timeout_seconds, status
        )
        self.audit = AuditTrail(
            self.sessions, settings.audit, settings.node_name, self.metrics.audit_message
        )
        self.crashes = CrashRecords(settings.storage.data_dir)
        self.limits = AttemptLimits(settings.worker.max_attempts, settings.worker.max_interruptions)
        if models is None:
            models = self._load_models() if "work" in self.roles else {}
        self.models = models
        self.metrics.expected.update(self._expected_rates())
        extra = tuple(
            sorted({key for route in settings.routes for key in route.where} - {"CallingAETitle"})
        )
        self.ingest = Ingest(
            self.spool,
            self.engine,
            max_instance_bytes=int(settings.dicom.max_instance_mb * 2**20),
            min_free_bytes=settings.storage.min_free_mb * 1024 * 1024,
            extra_keywords=extra,
            on_floor=self.metrics.spool_below_floor,
        )
        self.scp = StorageSCP(
            settings.dicom,
            self.ingest,
            self.sessions,
            settings.node_name,
            metrics=self.metrics,
            audit=self.audit,
            commitment_reports=CommitmentReports(self.sessions, settings.dispatch).handle,
            listener=listener,
            shared=listener is not None and settings.processes.count("receive") > 1,
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
            self.ingest,
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
            ingest=self.ingest,
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
        self.duties = NodeDuties(
            settings, self.engine, self.sessions, self.spool, self.crashes, self.limits
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
        """Start the roles; as the whole node, first its duties (:class:`NodeDuties`)."""
        if self.status is None:
            self.duties.start()
        if "work" in self.roles:
            self._check_model_identities()
        self.audit.start()
        if "receive" in self.roles:
            self.scp.start()
        if "work" in self.roles:
            self.assembler.start()
            self.worker.start()
        if "dispatch" in self.roles:
            self.dispatcher.start()
        if "web" in self.roles:
            self.http.start()
        if "notify" in self.roles:
            self.notifier.start()

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
        if self.status is not None:
            problems = self.status.problems()
        elif not self.scp.listening:
            problems = ["the DICOM listener is not listening"]
        else:
            problems = []
        try:
            with self.read_sessions() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:
            problems.append(f"job log: {type(exc).__name__}: {exc}")
        missing = {route.model for route in self.settings.routes} - set(self.models)
        if missing and "work" in self.roles:
            problems.append(f"models not loaded: {', '.join(sorted(missing))}")
        if not self.ingest.space_left():
            problems.append(
                f"spool below its free-space floor ({self.settings.storage.min_free_mb} MB): "
                "refusing new instances"
            )
        return problems

    def stop(self) -> None:
        """Stop accepting, let in-flight associations finish, stop the stages (each stops
        whether or not it was started)."""
        self.http.stop()
        self.scp.stop(self.settings.processes.drain_seconds)
        self.assembler.stop()
        if self.status is None:
            self.duties.stop()
        self.worker.stop(self.settings.processes.drain_seconds)
        self.dispatcher.stop()
        self.notifier.stop()
        self.audit.stop()
        self.engine.dispose()


class NodeDuties:
    """What a node does once, however many processes run its roles: migrate the job log and
    recover at start, keep the heartbeat, and clean up after a process of its that died.

    Recovery touches what this node left and what dead nodes left (their associations,
    their partial files), never what a live node of the cluster is working on: with live
    peers, spool files written in the last ``node_timeout_seconds`` are re-indexed only once
    that time has passed (the heartbeat's deferred pass), by when their rows are committed.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        sessions: sessionmaker[Session],
        spool: Spool,
        crashes: CrashRecords,
        limits: AttemptLimits,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.sessions = sessions
        self.spool = spool
        self.crashes = crashes
        self.limits = limits
        self._reindex_before: float | None = None
        self.heartbeat = Heartbeat(
            sessions, settings.node_name, __version__, settings.cluster, self._reindex_late
        )

    def start(self) -> None:
        """Migrate, recover from a previous run, start the heartbeat."""
        name = self.settings.node_name
        timeout = self.settings.cluster.node_timeout_seconds
        upgrade(self.engine)
        with self.sessions.begin() as session:
            heartbeat(session, name, __version__, started=True)
        with self.sessions.begin() as session:
            dead = dead_nodes(session, timeout)
            peers = live_peers(session, name, timeout)
            lost = close_associations(session, [name, *dead])
            requeued = recover(session, name, self.crashes.of, self.limits)
            release_leases(session, name)
        self._forget_crashes(set(requeued.values()))
        self.crashes.forget_node(name)  # of processes that held no job
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
        self.heartbeat.start()

    def process_died(self, owner: str) -> None:
        """A process of this node (``<node>:<pid>``) died: close the associations it had
        open, judge the jobs it ran (by its crash record, as at a restart: the crash policy of
        docs/reliability.md) and free the deliveries it had claimed, now, without waiting for
        leases to expire."""
        with self.sessions.begin() as session:
            lost = close_associations(session, (), owner)
            requeued = recover(session, owner, self.crashes.of, self.limits)
            released = release_leases(session, owner)
        self._forget_crashes({owner})
        if lost or requeued or released:
            log.warning(
                "process %s died: %d associations closed, jobs %s judged, %d deliveries freed",
                owner,
                lost,
                sorted(requeued),
                released,
            )

    def _forget_crashes(self, owners: set[str]) -> None:
        for owner in owners:
            crash = self.crashes.of(owner)
            if crash is not None:
                log.warning("process %s had crashed: %s\n%s", owner, summary(crash), crash)
            self.crashes.forget(owner)

    def _reindex_late(self) -> None:
        """The re-index deferred at start: files written before the start, whatever their age."""
        if self._reindex_before is None:
            return
        added = reindex(self.sessions, self.spool, self._reindex_before)
        if added:
            log.warning("recovered from an unclean stop: %d spool files re-indexed", added)

    def stop(self) -> None:
        self.heartbeat.stop()
