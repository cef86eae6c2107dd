"""Faults really done: a full disk, kill -9 mid-association, and a chaos run of kills."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_ai_node.jobs.models import Delivery, Event, Instance, Job, Result
from dicom_ai_node.node import Node
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support.helpers import (
    acknowledged_by_storescu,
    free_port,
    http_json,
    instance,
    metric_sample,
    received_uids,
    run_tool,
    storescp,
    wait_for,
)
from tests.support.served import Served

pytestmark = [pytest.mark.peers, pytest.mark.slow]

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 24 MB file system (tmpfs), so that the disk can really fill up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _store_status(node: Node) -> int:
    from pynetdicom import AE

    ae = AE(ae_title="FILLER")
    ae.add_requested_context(CT)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="AINODE")
    assert assoc.is_established
    status = int(assoc.send_c_store(instance()).Status)
    assoc.release()
    return status


def test_full_disk_refuses_with_out_of_resources_and_resumes_by_itself(
    node_factory: Callable[..., Node], small_disk: Path
) -> None:
    node = node_factory(routes=[], storage={"data_dir": small_disk / "var", "min_free_mb": 8})
    assert _store_status(node) == 0x0000
    ballast = small_disk / "ballast"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    ballast.write_bytes(b"\0" * (free - 4 * 2**20))  # leave 4 MB: below the 8 MB floor
    time.sleep(1.1)  # the handler looks at the disk at most once a second
    assert _store_status(node) == 0xA700
    code, health = http_json(f"http://127.0.0.1:{node.http.port}/healthz")
    assert code == 503
    assert "free-space floor" in json.dumps(health)
    metrics = f"http://127.0.0.1:{node.http.port}/metrics"
    assert metric_sample(metrics, "dicom_ai_node_spool_below_floor ") == "1.0"
    ballast.unlink()
    wait_for(lambda: _store_status(node) == 0x0000, timeout=10, interval=0.3)
    assert http_json(f"http://127.0.0.1:{node.http.port}/healthz")[0] == 200
    with node.read_sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 2


def _acknowledged_by_dcmsend(dcmsend_log: str, files: list[Path]) -> set[str]:
    """SOP Instance UIDs that dcmsend (-v, one association) saw acknowledged: message N
    carries the N-th file."""
    acknowledged, current = set(), None
    for line in dcmsend_log.splitlines():
        if line.startswith("I: Sending C-STORE Request (MsgID "):
            current = int(line.split("MsgID ", 1)[1].split(",", 1)[0])
        elif line.startswith("I: Received C-STORE Response (") and current is not None:
            if "Success" in line or "Warning" in line:
                path = files[current - 1]
                acknowledged.add(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
            current = None
    return acknowledged


def test_kill_mid_association_keeps_every_acknowledged_instance(
    tmp_path: Path,
) -> None:
    study = generate_studies(
        Task.HEAD_CT_HEMORRHAGE, Label.NEGATIVE, 1, tmp_path / "in", seed=11, slices=200
    )[0]
    files = sorted(study.rglob("*.dcm"))
    served = Served(tmp_path)
    served.start()
    try:
        sender = subprocess.Popen(
            ["storescu", "-v", "-aec", "AINODE", "127.0.0.1", str(served.port), *map(str, files)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stderr=subprocess.PIPE,
            text=True,
        )
        engine = served.engine()

        def some_stored() -> bool:
            with Session(engine) as session:
                return (session.scalar(select(func.count()).select_from(Instance)) or 0) > 20

        wait_for(some_stored, timeout=60, interval=0.01)
        served.signal(signal.SIGKILL)
        _, log = sender.communicate(timeout=60)
        assert sender.returncode != 0  # the association died under it
        acknowledged = acknowledged_by_storescu(log)
        assert 0 < len(acknowledged) < len(files)  # killed in the middle of the series
        served.start()  # restart: re-indexes the spool, closes the lost association
        with Session(engine) as session:
            rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
        assert acknowledged <= set(rows)
        assert all((served.data / rows[uid].path).is_file() for uid in acknowledged)
        assert not list(served.data.rglob(".tmp-*"))
        engine.dispose()
    finally:
        served.kill()


CHAOS_MIN_KILLS, CHAOS_MAX_KILLS = 5, 12


@pytest.mark.timeout(900)  # ~1 min on an idle machine; restarts take longer on a busy one
def test_chaos_thirty_studies_with_random_kills(tmp_path: Path) -> None:
    """Sends 30 studies while the node is killed (-9) and restarted at random moments;
    then every acknowledged instance is stored, every job completes, and each job has one
    set of results (no second copy with other UIDs).

    What the crash policy guarantees (docs/reliability.md): a kill from outside is never
    counted against the job it interrupts, so with the backstop (``max_interruptions``) above
    the number of kills every job finishes, however the kills fall."""
    rng = random.Random(2026)
    studies = [
        *generate_studies(Task.CXR_OPACITY, Label.POSITIVE, 8, tmp_path / "in", seed=5, size=256),
        *generate_studies(Task.CXR_OPACITY, Label.NEGATIVE, 8, tmp_path / "in", seed=6, size=256),
        *generate_studies(
            Task.HEAD_CT_HEMORRHAGE, Label.POSITIVE, 7, tmp_path / "in", seed=7, slices=6, size=128
        ),
        *generate_studies(
            Task.HEAD_CT_HEMORRHAGE, Label.NEGATIVE, 7, tmp_path / "in", seed=8, slices=6, size=128
        ),
    ]
    rng.shuffle(studies)
    served = Served(tmp_path)
    served.env["DICOM_AI_NODE_WORKER__MAX_INTERRUPTIONS"] = "1000"  # more than the kills
    served.start()
    engine = served.engine()
    acknowledged: set[str] = set()
    kills = 0
    sending = threading.Event()
    sending.set()

    def killer() -> None:
        """Kill -9 and restart the node at random moments while the studies go in: in the
        middle of associations, of inference, of writing results, or idle. At least
        MIN_KILLS (then during the processing of the last ones), at most MAX_KILLS, so that a
        slow machine does not turn into more kills and a longer run."""
        nonlocal kills
        while kills < CHAOS_MAX_KILLS and (sending.is_set() or kills < CHAOS_MIN_KILLS):
            time.sleep(rng.uniform(1.0, 3.0))
            served.signal(signal.SIGKILL)
            kills += 1
            served.start()

    chaos = threading.Thread(target=killer)
    chaos.start()
    try:
        for study in studies:
            files = sorted(study.rglob("*.dcm"))
            give_up = time.monotonic() + 180
            while True:  # a sender retries until it is all acknowledged
                # dcmsend proposes each file's own (possibly compressed) transfer syntax.
                result = subprocess.run(
                    [
                        "dcmsend",
                        "-v",
                        "-aec",
                        "AINODE",
                        "127.0.0.1",
                        str(served.port),
                        *map(str, files),
                    ],
                    env={**os.environ, "TCP_NODELAY": "1"},
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                acknowledged |= _acknowledged_by_dcmsend(result.stdout + result.stderr, files)
                if result.returncode == 0:
                    break
                assert time.monotonic() < give_up, f"{study.name} never acknowledged: {result}"
                time.sleep(0.5)  # the node is restarting
        sending.clear()
        chaos.join()

        def all_finished() -> list[Job] | None:
            with Session(engine) as session:
                jobs = list(session.scalars(select(Job)))
            if len(jobs) >= len(studies) and all(
                j.state in ("done", "failed", "skipped") for j in jobs
            ):
                return jobs
            return None

        jobs = wait_for(all_finished, timeout=240, interval=0.5)
        with Session(engine) as session:
            stored = set(session.scalars(select(Instance.sop_instance_uid)))
            results = list(session.scalars(select(Result)))
            unfinished = {
                job.id: [
                    e.message
                    for e in session.scalars(select(Event).where(Event.job_id == job.id))
                    if e.kind in ("job_queued", "job_failed")
                ]
                for job in jobs
                if job.state == "failed"
            }
    finally:
        served.kill()
        engine.dispose()
    sent = {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for s in studies
        for p in s.rglob("*.dcm")
    }
    # a second job for one series, or a second SR/SC/KOS for one job, would be a duplicate
    series_jobs = [j for j in jobs if j.state != "skipped"]
    kinds_per_job = Counter((r.job_id, r.kind) for r in results)
    duplicates = sum(n - 1 for n in kinds_per_job.values()) + (
        len(series_jobs) - len({(j.series_instance_uid, j.generation) for j in series_jobs})
    )
    print(
        f"chaos: {len(studies)} studies, {len(sent)} instances sent, {len(acknowledged)} "
        f"acknowledged at first try or retry, {len(stored)} stored, {kills} kills (-9), "
        f"{len([j for j in jobs if j.state == 'done'])} jobs done, {len(results)} results, "
        f"{duplicates} duplicates"
    )
    assert CHAOS_MIN_KILLS <= kills <= CHAOS_MAX_KILLS
    assert duplicates == 0
    assert acknowledged <= stored
    assert stored == sent  # the senders' retries got everything in
    assert unfinished == {}, f"jobs that did not finish, with their events: {unfinished}"
    assert {j.state for j in series_jobs} == {"done"}
    assert sum(j.interruptions for j in series_jobs) <= kills
    assert len({(j.series_instance_uid, j.generation) for j in series_jobs}) == len(series_jobs)
    per_job: dict[int, set[str]] = {}
    for produced in results:
        per_job.setdefault(produced.job_id, set()).add(produced.kind)
    # one SR and one SC per job, whatever the kills: re-runs reuse the same UIDs
    assert all({"sr", "sc"} <= kinds for kinds in per_job.values())
    assert len(results) == sum(len(k) for k in per_job.values())
    outbox = {p.stem for p in served.data.joinpath("outbox").rglob("*.dcm")}
    assert outbox == {r.sop_instance_uid for r in results}


def test_kill_during_delivery_and_restart_delivers_each_result_once(tmp_path: Path) -> None:
    """The PACS is down, so results wait in the delivery queue; the node is killed (-9),
    the PACS comes up, the node restarts: every result arrives, under the UID the job log
    recorded, and nothing else."""

    pacs_port = free_port()
    config = tmp_path / "node.toml"
    routes = "".join(
        f'[[routes]]\nname = "{name}"\nmodel = "{model}"\nwhere = {{ Modality = {modalities} }}\n'
        f'outputs = ["sr", "sc"]\ndestinations = ["pacs"]\n'
        for name, model, modalities in (
            ("cxr", "cxr-opacity-demo", '["CR", "DX"]'),
            ("head", "head-ct-hemorrhage-demo", '["CT"]'),
        )
    )
    config.write_text(
        f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        f"port = {pacs_port}\n[dispatch]\nretry_base_seconds = 0.2\nretry_max_seconds = 0.5\n"
        f"max_attempts = 1000\n{routes}"
    )
    studies = [
        generate_studies(Task.CXR_OPACITY, Label.POSITIVE, 1, tmp_path / "in", seed=21)[0],
        generate_studies(
            Task.HEAD_CT_HEMORRHAGE, Label.POSITIVE, 1, tmp_path / "in", seed=22, slices=8, size=128
        )[0],
    ]
    served = Served(tmp_path, config)
    served.start()
    engine = served.engine()
    try:
        for study in studies:
            run_tool(
                "dcmsend", "-aec", "AINODE", "127.0.0.1", str(served.port), "+sd", "+r", str(study)
            )

        def waiting_to_deliver() -> bool:
            with Session(engine) as session:
                jobs = list(session.scalars(select(Job)))
                retried = session.scalar(
                    select(func.count()).select_from(Delivery).where(Delivery.attempts > 0)
                )
            return len(jobs) == 2 and all(j.state == "delivering" for j in jobs) and bool(retried)

        wait_for(waiting_to_deliver, timeout=90)
        served.signal(signal.SIGKILL)
        with storescp(pacs_port, tmp_path / "pacs") as folder:
            served.start()

            def all_done() -> bool:
                with Session(engine) as session:
                    return {j.state for j in session.scalars(select(Job))} == {"done"}

            wait_for(all_done, timeout=90)
            with Session(engine) as session:
                recorded = sorted(session.scalars(select(Result.sop_instance_uid)))
            assert received_uids(folder) == recorded
        assert len(recorded) == 4
    finally:
        served.kill()
        engine.dispose()
