"""The crash policy on a real `serve` process, without randomness (docs/reliability.md).

One job, one node, a model whose network aborts the process or stalls on demand
(:mod:`tests.support.poison`): while it aborts, every attempt crashes the worker process, which
the supervisor restarts, and after ``max_attempts`` crashes the job is failed with the crash
named, while the node stays up; then ``jobs retry`` runs it again, and this time the worker
process and then the whole node are killed from outside (-9), more times than
``max_attempts``, while the job runs: those kills are not the job's fault, and it finishes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_ai_node.jobs.models import Event, Job
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support import poison
from tests.support.helpers import ROOT, metric_sample, run_tool, wait_for
from tests.support.served import Served

pytestmark = [pytest.mark.peers, pytest.mark.slow]

MAX_ATTEMPTS = 2
KILLS = 3  # more than MAX_ATTEMPTS


def test_poison_job_fails_after_its_crashes_and_outside_kills_do_not_count(
    tmp_path: Path,
) -> None:
    poison.write_package(tmp_path / "models")
    config = tmp_path / "node.toml"
    config.write_text(
        f'node_name = "crashtest"\n[models]\ndirs = ["{tmp_path / "models"}"]\n'
        f"[worker]\nmax_attempts = {MAX_ATTEMPTS}\nmax_interruptions = 10\n"
        '[[routes]]\nname = "cxr"\nmodel = "tripwire"\nwhere = { Modality = ["CR", "DX"] }\n'
        'outputs = ["sr"]\n'
    )
    tripwire = tmp_path / "tripwire"
    tripwire.mkdir()
    served = Served(tmp_path, config)
    served.env["PYTHONPATH"] = poison.sitecustomize(tmp_path / "site")
    served.env[poison.ENV] = str(tripwire)
    study = generate_studies(Task.CXR_OPACITY, Label.POSITIVE, 1, tmp_path / "in", seed=3)[0]
    engine = served.engine()

    def job() -> Job | None:
        with Session(engine) as session:
            return session.scalars(select(Job)).first()

    def running_here() -> bool:
        assert served.proc is not None and served.proc.poll() is None, served.log.read_text()
        found = job()
        workers = served.children("work")
        return found is not None and [found.lease_owner] == [f"crashtest:{w}" for w in workers]

    def work_restarts() -> str:
        return metric_sample(
            served.url("/metrics"), 'dicom_ai_node_process_restarts_total{role="work"'
        )

    def judged(interruptions: int) -> bool:
        found = job()
        return found is not None and found.interruptions == interruptions

    (tripwire / "abort").touch()
    served.start()
    try:
        supervisor = served.proc
        run_tool(
            "dcmsend", "-aec", "AINODE", "127.0.0.1", str(served.port), "+sd", "+r", str(study)
        )
        failed = wait_for(
            lambda: (j := job()) is not None and j.state == "failed" and j, timeout=240
        )
        assert (failed.attempts, failed.interruptions) == (MAX_ATTEMPTS, 0)
        assert f"crashed on this job {MAX_ATTEMPTS} times (Fatal Python error: Aborted)" in (
            failed.error or ""
        )
        assert served.proc is supervisor and supervisor is not None
        assert supervisor.poll() is None  # the node stayed up
        assert wait_for(lambda: work_restarts() == f"{MAX_ATTEMPTS}.0" or None) is True
        run_tool("echoscu", "-aec", "AINODE", "127.0.0.1", str(served.port))

        (tripwire / "abort").unlink()
        (tripwire / "stall").touch()
        retried = subprocess.run(
            [sys.executable, "-m", "dicom_ai_node", "jobs", "retry", str(failed.id)],
            env=served.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert retried.returncode == 0, retried.stderr
        for kill in range(KILLS):
            wait_for(running_here, timeout=120)
            if kill % 2 == 0:  # the worker process: the supervisor restarts it
                os.kill(served.children("work")[0], signal.SIGKILL)
            else:  # the whole node: started again
                served.signal(signal.SIGKILL)
                served.start()
            wait_for(partial(judged, kill + 1), timeout=120)
        wait_for(running_here, timeout=120)
        (tripwire / "stall").unlink()
        done = wait_for(lambda: (j := job()) is not None and j.state == "done" and j, timeout=60)
        assert (done.attempts, done.interruptions) == (KILLS + 1, KILLS)
        with Session(engine) as session:
            messages = [e.message for e in session.scalars(select(Event).where(Event.job_id == 1))]
        assert sum("interrupted, not counted" in m for m in messages) == KILLS
        assert sum("counted as failed: its worker process" in m for m in messages) == 1
        # crash records: only the live processes', none left of the dead
        live = {f"crashtest_{pid}.log" for pid in served.children()}
        assert {p.name for p in (served.data / "crashes").glob("*.log")} <= live
    finally:
        served.kill()
        engine.dispose()
