"""The JSON API over real HTTP on loopback, against a real SQLite job log."""

from __future__ import annotations

from datetime import timedelta
from io import BytesIO

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from sqlalchemy import select

from dicom_ai_node.jobs.models import Delivery, Job, JobState, utcnow
from dicom_ai_node.jobs.store import add_event
from dicom_ai_node.metrics import NodeMetrics
from tests.support.joblog import TOKEN


def test_api_and_dashboard_refuse_missing_or_wrong_tokens(serve, job_log):
    job_log.add("secret", JobState.DONE, 0.9)
    running = serve()
    with running.client(token=None) as anonymous:
        missing = anonymous.get("/api/jobs")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        page = anonymous.get("/")
        assert page.status_code == 401
        assert "access token" in page.text
        assert "PID-secret" not in page.text
        assert (
            anonymous.get("/api/jobs", headers={"Authorization": "Basic eDp5"}).status_code == 401
        )
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/metrics").status_code == 200
    with running.client(token="wrong") as wrong:
        assert wrong.get("/api/jobs").status_code == 403
        assert wrong.get("/jobs").status_code == 403
    with running.client() as client:
        assert client.get("/api/jobs").json()["items"][0]["patient_id"] == "PID-secret"


def test_token_in_the_address_becomes_a_cookie(serve, job_log):
    job_log.add("cookie", JobState.DONE, 0.9)
    running = serve()
    with running.client(token=None) as browser:
        assert browser.get("/jobs?token=nope").status_code == 403
        signed_in = browser.get(f"/jobs?state=done&token={TOKEN}")
        assert signed_in.status_code == 303
        assert signed_in.headers["location"] == "/jobs?state=done"
        cookie = signed_in.headers["set-cookie"]
        assert "httponly" in cookie.lower()
        assert TOKEN not in cookie
        page = browser.get("/jobs?state=done")
        assert page.status_code == 200
        assert "PID-cookie" in page.text
        assert browser.get("/api/worklist").status_code == 200
        browser.cookies.set(next(iter(browser.cookies.keys())), "forged")
        assert browser.get("/jobs").status_code == 403


def test_generated_or_environment_token(serve, monkeypatch):
    monkeypatch.delenv("DICOM_AI_NODE_HTTP_TOKEN", raising=False)
    generated = serve(token="")
    assert generated.server.token_generated
    assert len(generated.server.token) >= 24
    assert generated.server.login_url.endswith(f"?token={generated.server.token}")
    with httpx.Client(follow_redirects=True) as browser:
        page = browser.get(generated.server.login_url)
        assert page.status_code == 200
        assert "Triage worklist" in page.text
    monkeypatch.setenv("DICOM_AI_NODE_HTTP_TOKEN", "from-the-environment")
    from_env = serve(token="")
    assert not from_env.server.token_generated
    with from_env.client("from-the-environment") as client:
        assert client.get("/api/queue").status_code == 200


def test_healthz_reports_problems_with_503(serve):
    running = serve()
    with running.client(token=None) as client:
        ok = client.get("/healthz")
        assert (ok.status_code, ok.json()) == (200, {"status": "ok", "problems": []})
        running.problems.append("DICOM listener is not listening on port 11112")
        down = client.get("/healthz")
        assert down.status_code == 503
        assert down.json()["problems"] == ["DICOM listener is not listening on port 11112"]


def test_healthz_is_503_when_the_check_itself_fails(serve):
    def broken() -> list[str]:
        raise ConnectionError("database is gone")

    running = serve(health=broken)
    with running.client(token=None) as client:
        response = client.get("/healthz")
    assert response.status_code == 503
    assert "database is gone" in response.json()["problems"][0]


def test_jobs_list_filters_pages_and_joins_the_study(serve, job_log):
    old = utcnow() - timedelta(days=3)
    job_log.add("old", JobState.DONE, 0.2, created=old)
    job_log.add("pos", JobState.DELIVERING, 0.8, image=True, deliveries={"pacs": "done"})
    job_log.add("queued", JobState.QUEUED)
    job_log.add("failed", JobState.FAILED)
    running = serve()
    with running.client() as client:
        everything = client.get("/api/jobs").json()
        assert everything["total"] == 4
        assert [j["patient_id"] for j in everything["items"]] == [
            "PID-failed",
            "PID-queued",
            "PID-pos",
            "PID-old",
        ]
        positive = everything["items"][2]
        assert positive["accession_number"] == "ACC-pos"
        assert positive["label"] == "opacity"
        assert positive["model"] == "cxr-demo"
        assert positive["model_version"] == "1.0.0"
        assert positive["deliveries"] == [
            {
                "destination": "pacs",
                "state": "done",
                "delivered": 1,
                "committed": 0,
                "total": 1,
                "attempts": 1,
                "last_error": None,
                "sent_by": [],
            }
        ]
        states = client.get("/api/jobs", params={"state": ["queued", "failed"]}).json()
        assert {j["state"] for j in states["items"]} == {"queued", "failed"}
        assert client.get("/api/jobs", params={"label": "normal"}).json()["total"] == 1
        assert client.get("/api/jobs", params={"model": "other"}).json()["total"] == 0
        since = (utcnow() - timedelta(days=1)).replace(tzinfo=None).isoformat()
        assert client.get("/api/jobs", params={"since": since}).json()["total"] == 3
        page = client.get("/api/jobs", params={"limit": 2, "offset": 2}).json()
        assert (page["total"], [j["patient_id"] for j in page["items"]]) == (
            4,
            ["PID-pos", "PID-old"],
        )
        assert client.get("/api/jobs", params={"state": "bogus"}).status_code == 422


def test_job_detail_has_its_history(serve, job_log):
    job_id = job_log.add("detail", JobState.DONE, 0.7, image=True)
    with job_log.sessions.begin() as session:
        add_event(session, "job_done", f"job {job_id}: all results delivered", job_id=job_id)
    running = serve()
    with running.client() as client:
        detail = client.get(f"/api/jobs/{job_id}").json()
        assert [e["kind"] for e in detail["events"]] == ["job_queued", "job_done"]
        assert detail["results"][0]["kind"] == "sc"
        assert detail["study_description"] == "Chest PA"
        assert client.get("/api/jobs/999").status_code == 404


def test_worklist_puts_positive_findings_first(serve, job_log):
    job_log.add("neg", JobState.DONE, 0.1)
    job_log.add("pos-low", JobState.DONE, 0.6, priority=5)
    job_log.add("queued", JobState.QUEUED, priority=1)
    job_log.add("skipped", JobState.SKIPPED)
    job_log.add("pos-high", JobState.FAILED_TO_DELIVER, 0.97)
    job_log.add("failed", JobState.FAILED)
    job_log.add("running", JobState.RUNNING, priority=3)
    job_log.add("pos-tie", JobState.DELIVERING, 0.6, priority=9)
    running = serve()
    with running.client() as client:
        items = client.get("/api/worklist").json()
    assert [(i["patient_id"], i["triage"]) for i in items] == [
        ("PID-pos-high", "positive"),
        ("PID-pos-tie", "positive"),
        ("PID-pos-low", "positive"),
        ("PID-running", "pending"),
        ("PID-queued", "pending"),
        ("PID-failed", "failed"),
        ("PID-neg", "negative"),
    ]


def test_retry_requeues_a_failed_job_and_resends_failed_deliveries(serve, job_log):
    failed = job_log.add("failed", JobState.FAILED)
    undelivered = job_log.add(
        "undelivered", JobState.FAILED_TO_DELIVER, 0.9, image=True, deliveries={"pacs": "failed"}
    )
    queued = job_log.add("queued", JobState.QUEUED)
    running = serve()
    with running.client() as client:
        requeued = client.post(f"/api/jobs/{failed}/retry")
        assert requeued.status_code == 200
        assert requeued.json() == {
            "job_id": failed,
            "action": "requeued",
            "deliveries": 0,
            "state": "queued",
        }
        resent = client.post(f"/api/jobs/{undelivered}/retry").json()
        assert (resent["action"], resent["deliveries"], resent["state"]) == (
            "resend",
            1,
            "delivering",
        )
        conflict = client.post(f"/api/jobs/{queued}/retry")
        assert conflict.status_code == 409
        assert "queued already" in conflict.json()["detail"]
        assert client.post("/api/jobs/424242/retry").status_code == 404
        history = client.get(f"/api/jobs/{failed}").json()["events"]
        assert history[-1]["message"] == f"job {failed} queued again by an operator"
    with job_log.sessions() as session:
        assert session.get(Job, failed).attempts == 0
        delivery = session.scalars(select(Delivery).where(Delivery.job_id == undelivered)).one()
        assert (delivery.state, delivery.attempts) == ("pending", 0)


def test_destinations_show_last_success_and_failure(serve, job_log):
    job_id = job_log.add("sent", JobState.DONE, 0.3, image=True, deliveries={"pacs": "done"})
    failing = job_log.add(
        "stuck", JobState.DELIVERING, 0.8, image=True, deliveries={"archive": "pending"}
    )
    with job_log.sessions.begin() as session:
        add_event(
            session,
            "delivery_retry",
            "sending to archive failed (no status connection refused)",
            job_id=failing,
            destination="archive",
            status=None,
        )
    running = serve()
    with running.client() as client:
        found = {d["name"]: d for d in client.get("/api/destinations").json()}
    assert found["pacs"]["address"] == "PACS@127.0.0.1:11112"
    assert (found["pacs"]["health"], found["pacs"]["delivered"]) == ("ok", 1)
    assert found["pacs"]["last_success_at"] is not None
    assert found["archive"]["health"] == "failing"
    assert found["archive"]["pending"] == 1
    assert "connection refused" in found["archive"]["last_error"]
    assert job_id != failing


def test_result_image_is_the_secondary_capture_as_png(serve, job_log):
    job_id = job_log.add("img", JobState.DONE, 0.9, image=True)
    running = serve()
    with running.client() as client:
        result = client.get(f"/api/jobs/{job_id}").json()["results"][0]
        response = client.get(f"/api/results/{result['sop_instance_uid']}/image.png")
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert client.get("/api/results/1.2.3.4/image.png").status_code == 404
        sc = dcmread(job_log.folder / "results" / f"{result['sop_instance_uid']}.dcm")
    image = Image.open(BytesIO(response.content))
    assert image.size == (sc.Columns, sc.Rows)
    assert image.mode == "RGB"
    # The heat map is burned in: the picture is not grey everywhere.
    pixels = np.asarray(image, dtype=np.int16)
    assert np.abs(pixels[..., 0] - pixels[..., 1]).max() > 40


def test_metrics_exposition(serve, job_log):
    job_log.add("q1", JobState.QUEUED)
    job_log.add("q2", JobState.QUEUED)
    job_log.add("done", JobState.DONE, 0.2)
    ours, other = NodeMetrics(job_log.sessions), NodeMetrics(job_log.sessions)
    ours.instance_received("MODALITY1", 0x0000, 2048)
    ours.instance_received("MODALITY1", 0xA700, 0)
    ours.association_opened()
    ours.association_opened()
    ours.association_closed()
    ours.association_rejected()
    ours.inference_seconds("cxr-demo", 0.3)
    ours.end_to_end_seconds(12.0)
    ours.dispatch_attempt("pacs", ok=True)
    ours.dispatch_attempt("pacs", ok=False)
    other.instance_received("ELSEWHERE", 0, 1)
    running = serve(metrics=ours)
    with running.client(token=None) as client:
        response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    assert (
        samples[
            (
                "dicom_ai_node_instances_received_total",
                (("calling_aet", "MODALITY1"), ("status", "0x0000")),
            )
        ]
        == 1
    )
    assert (
        samples[
            (
                "dicom_ai_node_instances_received_total",
                (("calling_aet", "MODALITY1"), ("status", "0xA700")),
            )
        ]
        == 1
    )
    assert not any(labels and ("calling_aet", "ELSEWHERE") in labels for _, labels in samples)
    assert samples[("dicom_ai_node_received_bytes_total", ())] == 2048
    assert samples[("dicom_ai_node_associations_active", ())] == 1
    assert samples[("dicom_ai_node_associations_rejected_total", ())] == 1
    assert samples[("dicom_ai_node_inference_seconds_count", (("model", "cxr-demo"),))] == 1
    assert samples[("dicom_ai_node_end_to_end_seconds_sum", (("stage", "written"),))] == 12.0
    assert samples[("dicom_ai_node_dispatch_attempts_total", (("destination", "pacs"),))] == 2
    assert samples[("dicom_ai_node_dispatch_failures_total", (("destination", "pacs"),))] == 1
    assert samples[("dicom_ai_node_jobs", (("state", "queued"),))] == 2
    assert samples[("dicom_ai_node_jobs", (("state", "done"),))] == 1
    assert samples[("dicom_ai_node_jobs", (("state", "failed"),))] == 0
    assert samples[("dicom_ai_node_queue_depth", ())] == 2
    assert samples[("dicom_ai_node_database_up", ())] == 1


def test_refused_sources_are_listed_with_their_reasons(serve, job_log):
    with job_log.sessions.begin() as session:
        for address, reason in [
            ("127.0.0.9", "pending_per_address"),
            ("127.0.0.9", "pending_per_address"),
            ("127.0.0.9", "associations_per_address"),
            ("127.0.0.7", "address_not_allowed"),
        ]:
            add_event(
                session, "connection_refused", f"refused: {reason}", address=address, reason=reason
            )
    running = serve()
    with running.client() as client:
        found = client.get("/api/refused-sources").json()
        page = client.get("/destinations").text
    assert [(r["address"], r["reason"], r["minutes"]) for r in found] == [
        ("127.0.0.7", "address_not_allowed", 1),
        ("127.0.0.9", "associations_per_address", 1),
        ("127.0.0.9", "pending_per_address", 2),
    ]
    assert "Refused sources" in page and "pending_per_address" in page and "127.0.0.7" in page
