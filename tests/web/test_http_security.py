"""The HTTP side against a running server: security headers, failed-token rate limit (429),
cross-site request protection of state-changing requests."""

from __future__ import annotations

import re

import httpx

from dicom_ai_node.jobs.models import JobState
from dicom_ai_node.web.auth import MAX_FAILURES
from tests.support.joblog import TOKEN


def test_every_answer_carries_the_security_headers(serve, job_log):
    job_log.add("one", JobState.DONE, 0.9)
    running = serve()
    with running.client() as client, running.client(token=None) as anonymous:
        answers = [
            client.get("/"),
            client.get("/api/jobs"),
            anonymous.get("/healthz"),
            anonymous.get("/"),
            anonymous.get(f"/?token={TOKEN}"),
        ]
    assert [a.status_code for a in answers] == [200, 200, 200, 401, 303]
    for answer in answers:
        csp = answer.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "http" not in csp  # no external source of anything
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert answer.headers["x-content-type-options"] == "nosniff"


def test_wrong_tokens_are_rate_limited_per_address(serve):
    running = serve()
    with running.client(token="wrong") as wrong:
        for _ in range(MAX_FAILURES):
            assert wrong.get("/api/jobs").status_code == 403
        limited = wrong.get("/api/jobs")
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert wrong.get(f"/jobs?token={TOKEN}").status_code == 429  # even the right one
    with running.client() as right:
        assert right.get("/api/jobs").status_code == 429  # same address
    other = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(
        base_url=running.base, headers={"Authorization": f"Bearer {TOKEN}"}, transport=other
    ) as elsewhere:
        assert elsewhere.get("/api/jobs").status_code == 200


def test_state_changing_browser_requests_must_come_from_the_dashboard(serve, job_log):
    failed = job_log.add("failed", JobState.FAILED, None)
    labelled = job_log.add("labelled", JobState.DONE, 0.9)
    running = serve()
    with httpx.Client(base_url=running.base, timeout=10) as browser:
        assert browser.get(f"/jobs/{failed}?token={TOKEN}").status_code == 303  # the cookie
        page = browser.get(f"/jobs/{failed}")
        match = re.search(r'action="(/jobs/\d+/retry\?csrf=[0-9a-f]+)"', page.text)
        assert match is not None
        action = match.group(1)
        own = running.base
        # a cross-site form post (the cookie would go along with SameSite=None or old browsers)
        evil = browser.post(action, headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403
        # no form token: a forged request from a page that cannot read ours
        assert browser.post(f"/jobs/{failed}/retry", headers={"Origin": own}).status_code == 403
        assert (
            browser.post(f"/jobs/{failed}/retry?csrf=0", headers={"Origin": own}).status_code == 403
        )
        assert browser.post(f"/api/jobs/{failed}/retry", headers={"Origin": own}).status_code == 403
        done = browser.post(action, headers={"Origin": own})
        assert done.status_code == 303 and "retried=" in done.headers["location"]
        # the feedback form of a result's page is protected the same way, and works from it
        page = browser.get(f"/jobs/{labelled}")
        form = re.search(r'action="(/jobs/\d+/feedback\?csrf=[0-9a-f]+)"', page.text)
        assert form is not None
        body = {"agree": "yes", "author": "Dr A", "comment": "fine"}
        forged = browser.post(f"/jobs/{labelled}/feedback", data=body, headers={"Origin": own})
        assert forged.status_code == 403
        given = browser.post(form.group(1), data=body, headers={"Origin": own})
        assert given.status_code == 303
        assert "Dr A" in browser.get(f"/jobs/{labelled}").text
    with running.client() as script:  # a bearer token needs no form token
        assert script.post(f"/api/jobs/{failed}/retry").status_code == 409  # queued already
