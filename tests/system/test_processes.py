"""`serve` as a supervisor of one process per role: a child that dies is restarted and what it
held is cleaned up at once, nothing acknowledged is lost, ``--role`` runs a subset."""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from dicom_ai_node.jobs.models import Association, Instance, Job
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support import poison
from tests.support.helpers import (
    acknowledged_by_storescu,
    http_json,
    metric_sample,
    run_tool,
    wait_for,
)
from tests.support.served import Served

pytestmark = [pytest.mark.peers, pytest.mark.slow]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    node = Served(tmp_path)
    node.env["DICOM_AI_NODE_PROCESSES__RECEIVE"] = "2"
    yield node
    node.kill()


def _metric(served: Served, prefix: str) -> str:
    return metric_sample(served.url("/metrics"), prefix)


def _health(served: Served) -> dict[str, object]:
    return http_json(served.url("/healthz"))[1]


def _restarted(served: Served, role: str, dead: int) -> list[int]:
    """The role's processes once the supervisor has replaced ``dead`` and all are ready."""
    processes = served.processes()
    pids = [c.pid for c in processes if c.role == role and c.ready]
    if dead in pids or not all(c.ready for c in processes):
        return []
    return [pid for pid in pids if pid is not None]


def test_killed_receiver_process_loses_nothing_acknowledged_and_its_series_completes(
    served: Served, tmp_path: Path
) -> None:
    study = generate_studies(
        Task.HEAD_CT_HEMORRHAGE, Label.NEGATIVE, 1, tmp_path / "in", seed=5, slices=200
    )[0]
    files = sorted(study.rglob("*.dcm"))
    served.start()
    supervisor = served.proc
    assert supervisor is not None
    engine = served.engine()
    sender = subprocess.Popen(
        ["storescu", "-v", "-aec", "AINODE", "127.0.0.1", str(served.port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def receiving() -> str | None:
            with Session(engine) as session:
                stored = session.scalar(select(func.count()).select_from(Instance)) or 0
                owner = session.scalar(
                    select(Association.owner).where(Association.ended_at.is_(None))
                )
            return owner if stored > 20 else None

        owner = wait_for(receiving, timeout=120, interval=0.01)
        receiver = int(owner.rsplit(":", 1)[1])
        assert receiver in served.children("receive")
        os.kill(receiver, signal.SIGKILL)
        _, log = sender.communicate(timeout=120)
        assert sender.returncode != 0  # the association died under it
        acknowledged = acknowledged_by_storescu(log)
        assert 0 < len(acknowledged) < len(files)  # killed in the middle of the series

        # the supervisor, not a restart of the node, closes the association and replaces
        # the process; the series completes and is processed
        wait_for(lambda: _restarted(served, "receive", receiver), timeout=120)
        assert served.proc is supervisor
        with Session(engine) as session:
            outcome = session.scalar(select(Association.outcome).where(Association.owner == owner))
            rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
        assert outcome == "lost"
        assert acknowledged <= set(rows)
        assert all((served.data / rows[uid].path).is_file() for uid in acknowledged)

        def processed() -> Job | None:
            with Session(engine) as session:
                return session.scalars(select(Job).where(Job.state == "done")).first()

        assert (
            wait_for(processed, timeout=240).series_instance_uid
            == rows[next(iter(acknowledged))].series_instance_uid
        )
        run_tool("echoscu", "-aec", "AINODE", "127.0.0.1", str(served.port))
        assert (
            sum(
                float(
                    _metric(
                        served, f'dicom_ai_node_process_restarts_total{{role="receive",slot="{n}"'
                    )
                )
                for n in (0, 1)
            )
            == 1.0
        )
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.communicate()
        engine.dispose()


def _niceness(pid: int) -> int:
    """The scheduling niceness of process ``pid``'s main thread (field 19 of proc(5) stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[16])


def test_killed_worker_process_is_restarted_and_its_job_finishes(tmp_path: Path) -> None:
    poison.write_package(tmp_path / "models")
    config = tmp_path / "node.toml"
    config.write_text(
        f'node_name = "restarts"\n[models]\ndirs = ["{tmp_path / "models"}"]\n'
        '[[routes]]\nname = "cxr"\nmodel = "tripwire"\nwhere = { Modality = ["CR", "DX"] }\n'
        'outputs = ["sr"]\n'
    )
    tripwire = tmp_path / "tripwire"
    tripwire.mkdir()
    (tripwire / "stall").touch()
    served = Served(tmp_path, config)
    served.env["PYTHONPATH"] = poison.sitecustomize(tmp_path / "site")
    served.env[poison.ENV] = str(tripwire)
    study = generate_studies(Task.CXR_OPACITY, Label.POSITIVE, 1, tmp_path / "in", seed=3)[0]
    served.start()
    supervisor = served.proc
    assert supervisor is not None
    engine = served.engine()
    try:
        run_tool(
            "dcmsend", "-aec", "AINODE", "127.0.0.1", str(served.port), "+sd", "+r", str(study)
        )

        def job() -> Job | None:
            with Session(engine) as session:
                return session.scalars(select(Job)).first()

        def inferring() -> int | None:
            found = job()
            workers = served.children("work")
            if found is None or [found.lease_owner] != [f"restarts:{w}" for w in workers]:
                return None
            return workers[0]

        worker = wait_for(inferring, timeout=120)
        assert _health(served)["status"] == "ok"
        # the worker yields the cores to the receivers ([worker] nice, 10 by default)
        base = _niceness(supervisor.pid)
        assert _niceness(worker) == max(10, base)
        receivers = served.children("receive")
        assert receivers and {_niceness(pid) for pid in receivers} == {base}
        os.kill(worker, signal.SIGKILL)
        # judged at once by the supervisor (an interruption: not the job's fault), restarted
        wait_for(lambda: (j := job()) is not None and j.interruptions == 1, timeout=60)
        wait_for(lambda: _restarted(served, "work", worker), timeout=120)
        wait_for(inferring, timeout=120)
        (tripwire / "stall").unlink()
        done = wait_for(lambda: (j := job()) is not None and j.state == "done" and j, timeout=120)
        assert (done.attempts, done.interruptions) == (2, 1)
        assert served.proc is supervisor
        assert _metric(served, 'dicom_ai_node_process_restarts_total{role="work"') == "1.0"
        assert _metric(served, 'dicom_ai_node_process_up{role="work"') == "1.0"
        assert _health(served) == {"status": "ok", "problems": []}
    finally:
        served.kill()
        engine.dispose()


def test_roles_run_a_subset_and_a_dead_child_shows_in_healthz(served: Served) -> None:
    served.args = ["--role", "web", "--role", "receive"]
    # a dead child comes back only after an hour: the test sees it down for sure
    served.env["DICOM_AI_NODE_PROCESSES__RESTART_SECONDS"] = "3600"
    served.env["DICOM_AI_NODE_PROCESSES__RESTART_MAX_SECONDS"] = "3600"
    served.start()
    assert sorted((c.role, c.slot) for c in served.processes()) == [
        ("receive", 0),
        ("receive", 1),
        ("web", 0),
    ]
    run_tool("echoscu", "-aec", "AINODE", "127.0.0.1", str(served.port))
    assert _health(served) == {"status": "ok", "problems": []}
    dead = next(c for c in served.processes() if c.role == "receive")
    assert dead.pid is not None
    os.kill(dead.pid, signal.SIGKILL)
    down = f"process {dead.name} is down (killed by SIGKILL; restarted 0 times)"
    wait_for(lambda: _health(served) == {"status": "unavailable", "problems": [down]}, timeout=60)
    assert _metric(served, f'dicom_ai_node_process_up{{role="receive",slot="{dead.slot}"') == "0.0"
    run_tool("echoscu", "-aec", "AINODE", "127.0.0.1", str(served.port))  # the other one
    assert served.signal(signal.SIGTERM) == 0
    assert served.log.read_text().rstrip().endswith("stopped")


def test_a_restarted_child_runs_with_the_settings_the_node_started_with(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[dicom]\nae_title = "FIRSTAE"\n')
    served = Served(tmp_path, config)
    served.args = ["--role", "receive"]
    served.env["DICOM_AI_NODE_PROCESSES__RECEIVE"] = "1"
    served.env["DICOM_AI_NODE_PROCESSES__RESTART_SECONDS"] = "0.2"
    served.start()
    try:
        echo = ["echoscu", "-aec", "FIRSTAE", "127.0.0.1", str(served.port)]
        run_tool(*echo)
        # an operator edits the file while the node runs: the node restarts as a whole to
        # take it, never one child at a time, so a restarted child does as its siblings do
        for edit in ('[dicom]\nae_title = "SECONDAE"\n', '[dicom]\nae_title = "SECONDAE'):
            config.write_text(edit)  # the second is half-written: not valid TOML
            (dead,) = served.children("receive")
            os.kill(dead, signal.SIGKILL)
            wait_for(lambda: _restarted(served, "receive", dead), timeout=60)  # noqa: B023
            run_tool(*echo)
            refused = run_tool(
                "echoscu", "-aec", "SECONDAE", "127.0.0.1", str(served.port), check=False
            )
            assert refused.returncode != 0  # the called AE title is the first file's
        assert served.signal(signal.SIGTERM) == 0
    finally:
        served.kill()


def _open_owners(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return list(
            session.scalars(select(Association.owner).where(Association.ended_at.is_(None)))
        )


def test_the_receiver_processes_take_turns_at_new_associations(served: Served) -> None:
    """Four associations opened one after another into two receivers: two each (a process
    that holds connections lets an idle one accept first; see receive/guard.py)."""
    served.args = ["--role", "web", "--role", "receive"]
    served.start()
    engine = served.engine()
    ae = AE(ae_title="CT1")
    ae.add_requested_context(Verification)
    held = []
    try:
        for n in range(1, 5):
            assoc = ae.associate("127.0.0.1", served.port, ae_title="AINODE")
            assert assoc.is_established
            held.append(assoc)
            wait_for(lambda n=n: len(_open_owners(engine)) == n)  # type: ignore[misc]
        owners = Counter(_open_owners(engine))
        assert sorted(owners.values()) == [2, 2], owners
        assert {int(owner.rsplit(":", 1)[1]) for owner in owners} == set(served.children("receive"))
        for assoc in held:
            assert assoc.send_c_echo().Status == 0x0000
    finally:
        for assoc in held:
            assoc.release()
        engine.dispose()
