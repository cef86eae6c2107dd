"""Governance on a running node: shadow routes, radiologists' feedback, the model identity
(weights hash) in the job log, and changed weights under the same version refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from dicom_ai_node.cli import app
from dicom_ai_node.config import ConfigError
from dicom_ai_node.infer import BUNDLED_MODELS_DIR, LoadedModel
from dicom_ai_node.jobs.models import Delivery, Job, Notification
from dicom_ai_node.node import Node
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support.helpers import free_port, make_settings, wait_for
from tests.support.nodes import done_jobs, store_study

pytestmark = [pytest.mark.peers, pytest.mark.slow]

TOKEN = "governance-token-0123456789"
MODEL = "cxr-opacity-demo"


WHERE = {"Modality": ["CR", "DX"]}
LIVE = {"name": "live", "model": MODEL, "where": WHERE, "destinations": ["pacs"]}
TRIAL = {**LIVE, "name": "trial", "shadow": True}


def settings(port: int) -> dict[str, Any]:
    """A PACS and a webhook that are both down: the live job tries them, the shadow one not."""
    return {
        "http": {"token": TOKEN},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        "notifications": [{"url": f"http://127.0.0.1:{port}/hook", "on": ["positive"]}],
        "routes": [LIVE, TRIAL],
    }


def test_shadow_route_records_but_delivers_and_notifies_nothing_then_feedback(
    node_factory: Callable[..., Node], demo_models: dict[str, Any], tmp_path: Path
) -> None:
    node = node_factory(models={MODEL: demo_models[MODEL]}, **settings(free_port()))
    (study,) = generate_studies(Task.CXR_OPACITY, Label.POSITIVE, 1, tmp_path / "in", seed=4242)
    store_study(node, study)

    def finished() -> dict[str, Job] | None:
        with node.read_sessions() as session:
            jobs = {str(j.route): j for j in session.scalars(select(Job)) if j.label}
        return jobs if len(jobs) == 2 and all(j.label for j in jobs.values()) else None

    jobs = wait_for(finished, timeout=60)
    live, trial = jobs["live"], jobs["trial"]
    assert (trial.shadow, live.shadow) == (True, False)
    assert trial.state == "done" and trial.positive and live.positive
    assert trial.weights_sha256 == demo_models[MODEL].weights_sha256 == live.weights_sha256
    # A scan now sees both jobs' events: the live job's notification is queued (the webhook
    # is down, so it stays), the shadow job's is not.
    node.notifier.scan_once()
    with node.read_sessions() as session:
        assert {n.job_id for n in session.scalars(select(Notification))} == {live.id}
        assert {d.job_id for d in session.scalars(select(Delivery))} == {live.id}

    base = f"http://127.0.0.1:{node.http.port}"
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        shown = api.get(f"/api/jobs/{trial.id}").json()
        assert shown["shadow"] is True and shown["weights_sha256"] == trial.weights_sha256
        listed = api.get("/api/jobs").json()["items"]
        assert {j["id"]: j["shadow"] for j in listed} == {trial.id: True, live.id: False}
        page = api.get(f"/jobs/{trial.id}").text
        assert 'id="shadow"' in page and "never sent nor notified" in page
        assert 'id="feedback-form"' in page

        given = {"agree": False, "comment": "rib overlap", "author": "dr.a"}
        answer = api.post(f"/api/jobs/{live.id}/feedback", json=given)
        assert answer.status_code == 201, answer.text
        assert answer.json()["author"] == "dr.a" and answer.json()["agree"] is False
        form = api.post(
            f"/jobs/{live.id}/feedback",
            content="agree=yes&author=dr.b&comment=",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert form.status_code == 303 and "recorded" in form.headers["location"]
        assert api.post("/api/jobs/999999/feedback", json=given).status_code == 404
        assert api.post(f"/api/jobs/{live.id}/feedback", json={"agree": True}).status_code == 422
        feedback = api.get(f"/api/jobs/{live.id}").json()["feedback"]
        assert [(f["author"], f["agree"], f["comment"]) for f in feedback] == [
            ("dr.a", False, "rib overlap"),
            ("dr.b", True, ""),
        ]
        page = api.get(f"/jobs/{live.id}").text
        assert "Disagrees" in page and "rib overlap" in page and "dr.b" in page
        drift = api.get("/drift").text
        metrics = httpx.get(f"{base}/metrics").text
    version = demo_models[MODEL].card.version
    labels = f'model="{MODEL}",version="{version}"'
    for agree in ("true", "false"):
        assert f'dicom_ai_node_feedback{{agree="{agree}",{labels}}} 1.0' in metrics
    # Drift: two positives of two today, against the evaluation's 60 of 120 (41-59 %).
    assert f"dicom_ai_node_positive_rate{{{labels}}} 1.0" in metrics
    assert f"dicom_ai_node_positive_rate_outside_expected{{{labels}}} 1.0" in metrics
    assert f'data-model="{MODEL}"' in drift and "outside the expected interval" in drift
    assert "50% (41% to 59%)" in drift
    # evaluate --feedback: the live job's latest feedback agrees with its positive finding.
    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "{node.settings.database_url}"\n')
    args = ["evaluate", "--feedback", "--json", "--config", str(config)]
    printed = CliRunner().invoke(app, args)
    assert printed.exit_code == 0, printed.output
    (row,) = json.loads(printed.output)
    assert (row["model"], row["cases"], row["tp"], row["fp"]) == (MODEL, 1, 1, 0)
    assert row["sensitivity"] == 1.0 and row["specificity"] is None
    assert row["sensitivity_ci95"] == pytest.approx([0.2065, 1.0], abs=1e-3)


def _rows(node: Node, table: type) -> list[Any]:
    with node.read_sessions() as session:
        return list(session.scalars(select(table)))


def test_changed_weights_under_the_same_version_are_refused(
    node_factory: Callable[..., Node], demo_models: dict[str, Any], tmp_path: Path
) -> None:
    node = node_factory(models={MODEL: demo_models[MODEL]}, routes=[{**LIVE, "destinations": []}])
    (study,) = generate_studies(Task.CXR_OPACITY, Label.NEGATIVE, 1, tmp_path / "in", seed=7)
    store_study(node, study)
    done_jobs(node, 1)
    node.stop()
    # Same name and version, other weights (the same network saved again is other bytes).
    package = shutil.copytree(BUNDLED_MODELS_DIR / MODEL, tmp_path / "changed")
    with (package / "model.keras").open("ab") as f:
        f.write(b"\0")
    changed = LoadedModel(package)
    again = Node(
        make_settings(tmp_path, routes=[{**LIVE, "destinations": []}]), models={MODEL: changed}
    )
    with pytest.raises(ConfigError, match=rf"{MODEL} \(.*changed\): version .* earlier jobs"):
        again.start()
    again.stop()
