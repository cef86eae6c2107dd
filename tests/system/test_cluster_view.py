"""Any node of a cluster shows the whole cluster: two in-process nodes on 127.0.0.2 and .3
(as two hosts) share one PostgreSQL job log and one data folder; each one's API, dashboard
and metrics tell which node received, ran and delivered a study, and both nodes' health."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from dicom_ai_node import __version__
from dicom_ai_node.jobs.models import Job
from dicom_ai_node.node import Node
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support.helpers import (
    free_port,
    make_settings,
    received_uids,
    run_tool,
    storescp,
    wait_for,
)
from tests.support.postgres import empty_job_log

pytestmark = [pytest.mark.peers, pytest.mark.slow]


def client(node: Node) -> httpx.Client:
    """The node's own HTTP API, at its own address, with its token."""
    return httpx.Client(
        base_url=f"http://{node.settings.http.bind}:{node.http.port}",
        headers={"Authorization": f"Bearer {node.http.token}"},
        timeout=10,
    )


def test_each_node_shows_who_received_ran_and_delivered_a_study(
    postgres_url: str,
    tmp_path: Path,
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
) -> None:
    """node-a receives and dispatches, node-b runs the models (``serve --role receive
    --role dispatch`` on one host, ``--role work`` on a GPU host): the roles each node does
    not have are stopped once started, so who does what is known, not left to the race."""
    empty_job_log(postgres_url).dispose()
    port = free_port()
    routes = [{**route, "destinations": ["pacs"]} for route in shipped_routes]
    common: dict[str, Any] = {
        "database": {"url": postgres_url},
        "routes": routes,
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
    }
    nodes = {
        name: Node(
            make_settings(
                tmp_path, node_name=name, dicom={"bind": host}, http={"bind": host}, **common
            ),
            models=models,
        )
        for name, host, models in (
            ("node-a", "127.0.0.2", {}),
            ("node-b", "127.0.0.3", demo_models),
        )
    }
    receiver, worker = nodes["node-a"], nodes["node-b"]
    with storescp(port, tmp_path / "pacs") as pacs:
        try:
            for node in nodes.values():
                node.start()
            receiver.worker.stop()
            worker.dispatcher.stop()
            study = generate_studies(Task.CXR_OPACITY, Label.POSITIVE, 1, tmp_path / "synth", 77)[0]
            run_tool(
                "storescu",
                "+sd",
                "+r",
                "-aec",
                "AINODE",
                "127.0.0.2",
                str(receiver.scp.port),
                str(study),
            )

            def done() -> Job | None:
                with worker.read_sessions() as session:
                    job = session.scalars(
                        select(Job).where(Job.study_instance_uid == study.name)
                    ).first()
                return job if job is not None and job.state == "done" else None

            job = wait_for(done, timeout=120)
            views = {}
            for name, node in nodes.items():
                with client(node) as api:
                    views[name] = (
                        api.get(f"/api/jobs/{job.id}").json(),
                        {n["name"]: n for n in api.get("/api/nodes").json()},
                        api.get(f"/jobs/{job.id}").text,
                        api.get("/destinations").text,
                        api.get("/metrics").text,
                    )
        finally:
            for node in nodes.values():
                node.stop()
        assert len(received_uids(pacs)) == 2  # the SR and the SC, sent once
    for name, (detail, cluster, page, destinations, exposition) in views.items():
        assert detail["received_by"] == ["node-a"], name
        assert detail["ran_by"] == "node-b", name
        assert [(d["destination"], d["sent_by"], d["delivered"]) for d in detail["deliveries"]] == [
            ("pacs", ["node-a"], 2)
        ], name
        assert sorted(cluster) == ["node-a", "node-b"], name
        assert all(n["live"] and n["version"] == __version__ for n in cluster.values()), name
        assert '<dd id="received-by">node-a</dd>' in page and '<dd id="ran-by">node-b</dd>' in page
        assert '<td class="sent-by">node-a</td>' in page
        for node_name in cluster:
            assert f'<tr data-node="{node_name}" data-live="true">' in destinations, name
        up = {
            sample.labels["node"]: sample.value
            for family in text_string_to_metric_families(exposition)
            for sample in family.samples
            if sample.name == "dicom_ai_node_node_up"
        }
        assert up == {"node-a": 1, "node-b": 1}, name
