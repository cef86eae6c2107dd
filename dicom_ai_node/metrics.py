"""Prometheus metrics of one node, in a registry of its own.

Counters and histograms are fed by the node's stages through :class:`NodeMetrics` methods;
job, queue and cluster gauges are read from the job log at scrape time (so they are right
whichever process or host did the work, and any node's ``/metrics`` shows every node's
heartbeat). A registry per node lets several nodes run in one process (tests) without
clashing. Under ``serve``'s supervisor each role has processes of its own: their values go to
the node's multiprocess folder (``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor) and
``/metrics`` adds them up, with the state and restarts of each process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.config import ClusterSettings
from dicom_ai_node.infer.evaluation import ExpectedRate
from dicom_ai_node.jobs.models import utcnow
from dicom_ai_node.jobs.nodes import cluster_nodes
from dicom_ai_node.jobs.stats import (
    feedback_counts,
    jobs_by_state,
    positive_rates,
    queue_depth,
)
from dicom_ai_node.processes import ProcessStatus

log = logging.getLogger(__name__)

PREFIX = "dicom_ai_node"
# Seconds: a CNN on a CPU takes from tens of milliseconds to a minute for a large series.
_INFERENCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Seconds from the last instance received to the results written or delivered.
_END_TO_END_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)


class _JobLogCollector(Collector):
    """Jobs by state, queue depths and the cluster's nodes, read in the job log at each
    scrape."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        expected: Mapping[str, ExpectedRate],
        node_timeout_seconds: float,
    ) -> None:
        self.sessions = sessions
        self.expected = expected
        self.node_timeout_seconds = node_timeout_seconds

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}_database_up", "1 if the job log answered the scrape")
        try:
            with self.sessions() as session:
                states = jobs_by_state(session)
                depth = queue_depth(session)
                feedback = feedback_counts(session)
                today = [r for r in positive_rates(session, days=1) if r.day == utcnow().date()]
                nodes = cluster_nodes(session, self.node_timeout_seconds)
        except SQLAlchemyError:
            log.warning("metrics: the job log did not answer", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs in the job log by state", labels=["state"])
        for state, count in states.items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Jobs queued or running", value=depth.queued + depth.running
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_deliveries_pending",
            "Result deliveries waiting to be sent",
            value=depth.deliveries_pending,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_notifications_pending",
            "Webhook notifications waiting to be sent",
            value=depth.notifications_pending,
        )
        opinions = GaugeMetricFamily(
            f"{PREFIX}_feedback",
            "Radiologists' feedback on findings, by model, version and agreement",
            labels=["model", "version", "agree"],
        )
        for model, version, agree, count in feedback:
            opinions.add_metric([model, version, "true" if agree else "false"], count)
        yield opinions
        rates = GaugeMetricFamily(
            f"{PREFIX}_positive_rate",
            "Share of today's (UTC) finished jobs with a positive finding, by model version",
            labels=["model", "version"],
        )
        drift = GaugeMetricFamily(
            f"{PREFIX}_positive_rate_outside_expected",
            "1 when today's positive rate is outside the interval of the package's evaluation",
            labels=["model", "version"],
        )
        for day in today:
            rates.add_metric([day.model, day.version], day.rate)
            expected = self.expected.get(day.model)
            if expected is not None and expected.version == day.version:
                drift.add_metric([day.model, day.version], float(not expected.contains(day.rate)))
        yield rates
        yield drift
        alive = GaugeMetricFamily(
            f"{PREFIX}_node_up",
            "1 while a node of the cluster has sent a heartbeat within node_timeout_seconds",
            labels=["node"],
        )
        age = GaugeMetricFamily(
            f"{PREFIX}_node_heartbeat_age_seconds",
            "Seconds since each node of the cluster last wrote its heartbeat to the job log",
            labels=["node"],
        )
        for node in nodes:
            alive.add_metric([node.name], float(node.live))
            age.add_metric([node.name], node.heartbeat_age_seconds)
        yield alive
        yield age


class _ProcessCollector(Collector):
    """Each process of the node under its supervisor: up or not, and its restarts."""

    def __init__(self, status: ProcessStatus) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            f"{PREFIX}_process_up", "1 while the process is running", labels=["role", "slot"]
        )
        restarts = CounterMetricFamily(
            f"{PREFIX}_process_restarts",
            "Times the supervisor restarted the process after it died",
            labels=["role", "slot"],
        )
        for child in self.status.read():
            up.add_metric([child.role, str(child.slot)], int(child.running))
            restarts.add_metric([child.role, str(child.slot)], child.restarts)
        yield up
        yield restarts


class NodeMetrics:
    """The metrics of one node; the stages call the methods, ``/metrics`` exposes them.

    ``sessions`` reads the job log at scrape time (give the node's read-only sessions);
    a node whose heartbeat is older than ``node_timeout_seconds`` is shown down. ``status``,
    for a process of ``serve``'s supervisor, is where the node's processes are described and
    keep their values; ``/metrics`` then shows all of them.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        node_timeout_seconds: float = ClusterSettings().node_timeout_seconds,
        status: ProcessStatus | None = None,
    ) -> None:
        #: Per model name, the positive rate its package's evaluation leads to expect.
        #: (the node fills it once its models are loaded; the collector reads it at each scrape)
        self.expected: dict[str, ExpectedRate] = {}
        self.registry = CollectorRegistry()
        joblog = _JobLogCollector(sessions, self.expected, node_timeout_seconds)
        if status is None:
            self.registry.register(joblog)
            self._exposed = self.registry
        else:
            self._exposed = CollectorRegistry()
            self._exposed.register(joblog)
            self._exposed.register(_ProcessCollector(status))
            MultiProcessCollector(self._exposed, path=str(status.metrics_dir))  # type: ignore[no-untyped-call]
        self._instances = Counter(
            f"{PREFIX}_instances_received",
            "Instances received by C-STORE, by calling AE title and response status",
            ["calling_aet", "status"],
            registry=self.registry,
        )
        self._bytes = Counter(
            f"{PREFIX}_received_bytes", "Bytes of instances received", registry=self.registry
        )
        self._spool_full = Gauge(
            f"{PREFIX}_spool_below_floor",
            "1 while the spool's free space is below its floor and instances are refused",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self._associations_active = Gauge(
            f"{PREFIX}_associations_active",
            "DICOM associations open now",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self._associations = Counter(
            f"{PREFIX}_associations", "DICOM associations accepted", registry=self.registry
        )
        self._associations_rejected = Counter(
            f"{PREFIX}_associations_rejected",
            "DICOM association requests rejected",
            registry=self.registry,
        )
        self._connections_refused = Counter(
            f"{PREFIX}_connections_refused",
            "DICOM connections and association requests refused by a limit, by reason",
            ["reason"],
            registry=self.registry,
        )
        self._audit = Counter(
            f"{PREFIX}_audit_messages",
            "Audit messages, by outcome: stored (job log), sent (syslog repository), dropped "
            "(queue full), store_failed, send_failed (each failed attempt; retried)",
            ["outcome"],
            registry=self.registry,
        )
        self._inference = Histogram(
            f"{PREFIX}_inference_seconds",
            "Inference time of one job, by model",
            ["model"],
            buckets=_INFERENCE_BUCKETS,
            registry=self.registry,
        )
        self._end_to_end = Histogram(
            f"{PREFIX}_end_to_end_seconds",
            "From the last instance of a job received to its results written or delivered",
            ["stage"],
            buckets=_END_TO_END_BUCKETS,
            registry=self.registry,
        )
        self._dispatch_attempts = Counter(
            f"{PREFIX}_dispatch_attempts",
            "C-STORE attempts of results, by destination",
            ["destination"],
            registry=self.registry,
        )
        self._dispatch_failures = Counter(
            f"{PREFIX}_dispatch_failures",
            "Failed C-STORE attempts of results, by destination",
            ["destination"],
            registry=self.registry,
        )
        self._notifications = Counter(
            f"{PREFIX}_notification_attempts",
            "Webhook POST attempts, by outcome",
            ["outcome"],
            registry=self.registry,
        )

    def instance_received(self, calling_aet: str, status: int, nbytes: int) -> None:
        """One C-STORE request answered with ``status`` (0 = success); ``nbytes`` stored."""
        self._instances.labels(calling_aet, f"0x{status:04X}").inc()
        self._bytes.inc(nbytes)

    def spool_below_floor(self, below: bool) -> None:
        """Whether the node refuses instances for lack of disk space (0xA700)."""
        self._spool_full.set(1 if below else 0)

    def association_opened(self) -> None:
        self._associations.inc()
        self._associations_active.inc()

    def association_closed(self) -> None:
        """An accepted association ended (released, aborted or timed out)."""
        self._associations_active.dec()

    def association_rejected(self) -> None:
        self._associations_rejected.inc()

    def connection_refused(self, reason: str) -> None:
        """A connection or association refused by a ``[dicom.limits]`` budget or the
        source-address check (see ``receive/guard.py``)."""
        self._connections_refused.labels(reason).inc()

    def audit_message(self, outcome: str) -> None:
        self._audit.labels(outcome).inc()

    def inference_seconds(self, model: str, seconds: float) -> None:
        self._inference.labels(model).observe(seconds)

    def end_to_end_seconds(self, seconds: float, stage: str = "written") -> None:
        """Latency from the last instance received: ``stage`` is ``written`` (results in the
        outbox) or ``delivered`` (all results sent)."""
        self._end_to_end.labels(stage).observe(seconds)

    def dispatch_attempt(self, destination: str, ok: bool) -> None:
        self._dispatch_attempts.labels(destination).inc()
        if not ok:
            self._dispatch_failures.labels(destination).inc()

    def notification_attempt(self, ok: bool) -> None:
        self._notifications.labels("sent" if ok else "failed").inc()

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self._exposed)
