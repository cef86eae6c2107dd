"""The node as a process, as operators run it: `serve`, Ctrl-C, its logs.

A kill -9 of the whole node during a job and its restart: tests/system/test_crash_policy.py
and the chaos run of tests/system/test_faults.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_ai_node.jobs.models import Instance, Job
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support.helpers import run_tool, wait_for
from tests.support.served import Served

pytestmark = [pytest.mark.peers, pytest.mark.slow]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    node = Served(tmp_path)
    yield node
    node.kill()


def test_serve_with_shipped_config_answers_echo_and_stops_cleanly(served: Served) -> None:
    served.start()  # config/node.toml from the working directory, as `make run` does
    run_tool("echoscu", "-aec", "AINODE", "127.0.0.1", str(served.port))
    assert served.signal(signal.SIGINT) == 0
    log = served.log.read_text()
    assert "ready" in log and "stopped" in log
    assert "Traceback" not in log


def test_ctrl_c_lets_the_association_in_flight_finish(served: Served, tmp_path: Path) -> None:
    study = generate_studies(
        Task.HEAD_CT_HEMORRHAGE, Label.NEGATIVE, 1, tmp_path / "in", seed=3, slices=150
    )[0]
    served.start()
    sender = subprocess.Popen(
        ["storescu", "+sd", "+r", "-aec", "AINODE", "127.0.0.1", str(served.port), str(study)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stderr=subprocess.PIPE,
    )
    engine = served.engine()

    def some_stored() -> bool:
        with Session(engine) as session:
            return bool(session.scalars(select(Instance)).first())

    wait_for(some_stored, timeout=30, interval=0.01)
    assert served.signal(signal.SIGINT) == 0
    _, errors = sender.communicate(timeout=60)
    assert sender.returncode == 0, errors
    with Session(engine) as session:
        assert len(session.scalars(select(Instance)).all()) == 150
    assert not list(served.data.rglob(".tmp-*"))
    engine.dispose()


def test_json_lines_logs_carry_job_and_association_ids(served: Served, tmp_path: Path) -> None:
    study = generate_studies(Task.CXR_OPACITY, Label.POSITIVE, 1, tmp_path / "in", seed=9)[0]
    served.env["DICOM_AI_NODE_LOGGING__JSON_LINES"] = "true"
    served.start()
    run_tool("dcmsend", "-aec", "AINODE", "127.0.0.1", str(served.port), "+sd", "+r", str(study))
    engine = served.engine()

    def done() -> bool:
        with Session(engine) as session:
            return session.scalars(select(Job).where(Job.state == "done")).first() is not None

    wait_for(done, timeout=60)
    engine.dispose()
    assert served.signal(signal.SIGINT) == 0
    records = [
        json.loads(line) for line in served.log.read_text().splitlines() if line.startswith("{")
    ]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert any("association_id" in r and "stored" in r["message"] for r in records)
    assert {r["job_id"] for r in records if "job_id" in r} == {1}
