"""Webhook notifications against a real HTTP receiver on loopback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select

from dicom_ai_node.config import NotificationSettings
from dicom_ai_node.jobs.models import Event, JobState, Notification
from dicom_ai_node.jobs.queue import transition
from dicom_ai_node.notify import Notifier
from tests.support.helpers import free_port, wait_for


@dataclass
class Receiver:
    """Records each POST; answers with ``statuses`` in turn, then 200."""

    url: str
    statuses: list[int]
    received: list[tuple[int, dict[str, Any], dict[str, str]]] = field(default_factory=list)

    def accepted(self) -> list[dict[str, Any]]:
        return [body for status, body, _ in self.received if status == 200]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    box = Receiver("", [])
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                status = box.statuses.pop(0) if box.statuses else 200
                box.received.append((status, body, dict(self.headers)))
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/ai"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield box
    server.shutdown()
    server.server_close()


def finish(sessions, job_id: int, state: JobState, **fields: Any) -> None:
    with sessions.begin() as session:
        transition(session, job_id, state, f"job {job_id}: {state.value}", **fields)


def gave_up(sessions, url: str) -> bool:
    """Whether the notification to ``url`` failed for good (a new transaction each call)."""
    with sessions() as session:
        return (
            session.scalars(
                select(Notification.id).where(
                    Notification.url == url, Notification.state == "failed"
                )
            ).first()
            is not None
        )


def notifier(sessions, *webhooks: NotificationSettings) -> Notifier:
    return Notifier(
        sessions,
        webhooks,
        owner="test-node:1",
        node_name="test-node",
        dashboard_url="http://ai-node.example:8080/",
        poll_seconds=0.05,
    )


def test_positive_and_failed_jobs_are_posted_with_retries(job_log, receiver):
    receiver.statuses = [503]
    dead = f"http://127.0.0.1:{free_port()}/nobody"
    webhooks = [
        NotificationSettings(url=receiver.url, retry_base_seconds=0.1, headers={"X-Secret": "s"}),
        NotificationSettings(url=dead, on=["failed"], max_attempts=2, retry_base_seconds=0.1),
    ]
    sender = notifier(job_log.sessions, *webhooks)
    assert sender.scan_once() == 0  # the cursors start at the end of the log
    positive = job_log.add("POS", JobState.RUNNING)
    negative = job_log.add("NEG", JobState.RUNNING)
    failed = job_log.add("FAIL", JobState.RUNNING)
    finish(
        job_log.sessions,
        positive,
        JobState.DELIVERING,
        label="opacity",
        probability=0.93,
        positive=True,
    )
    finish(
        job_log.sessions, negative, JobState.DONE, label="normal", probability=0.1, positive=False
    )
    finish(job_log.sessions, failed, JobState.FAILED, error="model crashed")
    finish(job_log.sessions, positive, JobState.DONE)
    sender.start()
    try:
        wait_for(lambda: len(receiver.accepted()) == 2, timeout=15)
        wait_for(lambda: gave_up(job_log.sessions, dead), timeout=15)
    finally:
        sender.stop()

    bodies = {body["event"]: body for body in receiver.accepted()}
    assert bodies["positive"]["job_id"] == positive
    assert bodies["positive"]["accession_number"] == "ACC-POS"
    assert (bodies["positive"]["label"], bodies["positive"]["probability"]) == ("opacity", 0.93)
    assert bodies["positive"]["model"] == "cxr-demo"
    assert bodies["positive"]["dashboard_url"] == f"http://ai-node.example:8080/jobs/{positive}"
    assert bodies["failed"]["job_id"] == failed
    assert bodies["failed"]["error"] == "model crashed"
    assert "patient_id" not in bodies["positive"]
    first_status, first_body, headers = receiver.received[0]
    assert first_status == 503  # refused once, then retried
    assert len(receiver.received) == 3
    assert headers["X-Secret"] == "s"
    assert headers["Idempotency-Key"] == first_body["key"]

    with job_log.sessions() as session:
        kinds = session.scalars(
            select(Event.kind).where(
                Event.job_id.in_([positive, failed]), Event.kind.like("notification%")
            )
        ).all()
        history = session.scalars(
            select(Event.message).where(Event.job_id == failed, Event.kind == "notification_failed")
        ).all()
    assert sorted(kinds).count("notification_sent") == 2
    assert "notification_retry" in kinds
    assert len(history) == 1 and "after 2 attempts" in history[0]
    assert "/nobody" in history[0]


def test_restart_neither_loses_nor_duplicates(job_log, receiver):
    first = notifier(job_log.sessions, NotificationSettings(url=receiver.url))
    first.scan_once()
    queued_before_crash = job_log.add("A", JobState.RUNNING)
    finish(
        job_log.sessions,
        queued_before_crash,
        JobState.DONE,
        label="opacity",
        probability=0.8,
        positive=True,
    )
    assert first.scan_once() == 1  # in the outbox, then the process dies before sending
    while_down = job_log.add("B", JobState.RUNNING)
    finish(job_log.sessions, while_down, JobState.FAILED_TO_DELIVER, error="delivery failed")

    second = notifier(job_log.sessions, NotificationSettings(url=receiver.url))
    second.start()
    try:
        wait_for(lambda: len(receiver.accepted()) == 2, timeout=15)
    finally:
        second.stop()
    third = notifier(job_log.sessions, NotificationSettings(url=receiver.url))
    assert third.scan_once() == 0
    assert third.send_once() == 0
    assert sorted(body["job_id"] for body in receiver.accepted()) == [
        queued_before_crash,
        while_down,
    ]
    assert len(receiver.received) == 2
