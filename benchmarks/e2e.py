"""End-to-end latency with Orthanc as the PACS: last image in, last result back in Orthanc.

Orthanc (``/usr/sbin/Orthanc``, its own storage, loopback ports) holds a synthetic study and
sends it to the node (``POST /modalities/ainode/store``); the node, in this process with the
bundled demo models and the shipped routes plus Orthanc as destination, sends its results
back. The clock starts when the node acknowledged the study's last instance (max
``instances.received_at``) and stops when Orthanc acknowledged the last result (max
``deliveries.delivered_at``); both are the node's own timestamps. The configured stable time
(how long the node waits for more images of a series) is part of that span by design; it is
reported on its own and subtracted. Every run checks that Orthanc holds exactly the results
the node recorded. Cases: a one-image chest radiograph and a 200-slice head CT (512x512).

Stages (medians): ``wait`` from the last image to the job's start (the stable time plus the
assembler's poll), ``infer`` from the job's start to its results written (inference, heat
map, SR/SC/KOS), ``send`` from there to the last result acknowledged by Orthanc.

With ``--mpps`` each case also runs with a Modality Performed Procedure Step: right after
Orthanc has sent the study, a pynetdicom MPPS SCU creates a step and sets it COMPLETED with
the study's series and instances, so the series completes without the stable wait; both
totals (last image -> last result in Orthanc, stable time included) are printed side by side.

Usage: ``.venv/bin/python benchmarks/e2e.py [--runs 3] [--stable 1.0] [--slices 200] [--mpps]``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dicom_ai_node.config import Settings  # noqa: E402
from dicom_ai_node.demo import DEMO_ROUTES  # noqa: E402
from dicom_ai_node.jobs.models import Delivery, Instance, Job, Result  # noqa: E402
from dicom_ai_node.node import Node  # noqa: E402
from dicom_ai_node.synth import Label, Task, generate_studies  # noqa: E402
from tests.support.helpers import free_port  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402

TARGETS = {"radiograph": 2.0, "ct": 10.0}  # seconds, stable time excluded


@dataclass(frozen=True)
class Run:
    images: int
    total: float  # last image acknowledged -> last result acknowledged by Orthanc
    wait: float
    infer: float
    send: float


def send_mpps(node: Node, files: list[Path]) -> None:
    """N-CREATE a step IN PROGRESS, then N-SET it COMPLETED listing ``files`` (PS3.4 F.7)."""
    series: dict[str, list[Dataset]] = {}
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        series.setdefault(str(ds.SeriesInstanceUID), []).append(ref)
    performed = []
    for uid, refs in series.items():
        item = Dataset()
        item.SeriesInstanceUID = uid
        item.ReferencedImageSequence = refs
        performed.append(item)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title=node.settings.dicom.ae_title)
    if not assoc.is_established:
        raise RuntimeError("the node refused the MPPS association")
    step = generate_uid()
    try:
        created = Dataset()
        created.PerformedProcedureStepStatus = "IN PROGRESS"
        status, _ = assoc.send_n_create(created, ModalityPerformedProcedureStep, step)
        if status.Status != 0:
            raise RuntimeError(f"N-CREATE answered 0x{status.Status:04X}")
        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        done.PerformedSeriesSequence = performed
        status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, step)
        if status.Status != 0:
            raise RuntimeError(f"N-SET answered 0x{status.Status:04X}")
    finally:
        assoc.release()


def one_run(
    node: Node, orthanc: Orthanc, study: Path, timeout: float = 300, *, mpps: bool = False
) -> Run:
    """Send one study from Orthanc to the node and time it until its results are back."""
    files = sorted(study.rglob("*.dcm"))
    study_id = orthanc.upload(files)
    orthanc.send_study("ainode", study_id)
    if mpps:
        send_mpps(node, files)
    uid = study.name
    deadline = time.monotonic() + timeout
    while True:
        with node.read_sessions() as session:
            job = session.scalars(select(Job).where(Job.study_instance_uid == uid)).first()
            if job is not None and job.state in ("done", "failed", "failed_to_deliver"):
                if job.state != "done":
                    raise RuntimeError(f"job {job.id} ended {job.state}: {job.error}")
                received = session.scalar(
                    select(func.max(Instance.received_at)).where(Instance.study_instance_uid == uid)
                )
                written = session.scalar(
                    select(func.max(Result.created_at)).where(Result.job_id == job.id)
                )
                delivered = session.scalar(
                    select(func.max(Delivery.delivered_at)).where(Delivery.job_id == job.id)
                )
                results = {
                    r.sop_instance_uid: r.series_instance_uid
                    for r in session.scalars(select(Result).where(Result.job_id == job.id))
                }
                started = job.started_at
                break
        if time.monotonic() > deadline:
            raise RuntimeError(f"no result for {uid} within {timeout} s")
        time.sleep(0.05)
    assert received and written and delivered and started
    held = orthanc.instances_by_series_uid(study_id)
    for sop, series in results.items():
        if held.get(series) != [sop]:
            raise RuntimeError(f"Orthanc holds {held.get(series)} in {series}, expected [{sop}]")
    return Run(
        images=len(files),
        total=(delivered - received).total_seconds(),
        wait=(started - received).total_seconds(),
        infer=(written - started).total_seconds(),
        send=(delivered - written).total_seconds(),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per case (median reported)")
    parser.add_argument("--stable", type=float, default=1.0, help="assemble.stable_seconds")
    parser.add_argument("--slices", type=int, default=200, help="CT slices")
    parser.add_argument("--ct-size", type=int, default=512, help="CT matrix")
    parser.add_argument("--mpps", action="store_true", help="also run each case completed by MPPS")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        root = Path(tmp)
        node_port = free_port()
        orthanc = Orthanc(root / "orthanc", {"ainode": ("AINODE", "127.0.0.1", node_port)})
        settings = Settings.model_validate(
            {
                "node_name": "e2e-bench",
                "dicom": {"bind": "127.0.0.1", "port": node_port},
                "storage": {"data_dir": root / "var", "min_free_mb": 0},
                "http": {"bind": "127.0.0.1", "port": 0},
                "assemble": {"stable_seconds": args.stable},
                "destinations": [
                    {
                        "name": "pacs",
                        "ae_title": orthanc.aet,
                        "host": "127.0.0.1",
                        "port": orthanc.dicom_port,
                    }
                ],
                "routes": [{**r, "destinations": ["outbox", "pacs"]} for r in DEMO_ROUTES],
            }
        )
        cases = {
            "radiograph": (Task.CXR_OPACITY, {}),
            "ct": (Task.HEAD_CT_HEMORRHAGE, {"slices": args.slices, "size": args.ct_size}),
        }
        studies = {
            name: [
                generate_studies(task, Label.POSITIVE, 1, root / "synth" / name, seed, **kw)[0]
                for seed in range(args.runs * (2 if args.mpps else 1))
            ]
            for name, (task, kw) in cases.items()
        }
        orthanc.start()
        node = Node(settings)
        node.start()
        try:
            print(f"command: {' '.join([sys.executable, *sys.argv])}")
            print(
                f"stable time {args.stable:.1f} s (excluded below); node defaults otherwise "
                f"(assembler poll {settings.assemble.poll_seconds} s)"
            )
            failed = False
            for name, paths in studies.items():
                runs = [one_run(node, orthanc, study) for study in paths[: args.runs]]
                med = {
                    key: statistics.median(getattr(run, key) for run in runs)
                    for key in ("total", "wait", "infer", "send")
                }
                latency = med["total"] - args.stable
                target = TARGETS[name]
                failed |= latency >= target
                print(
                    f"{name:10} {runs[0].images:4d} images: {latency:6.2f} s excluding stable "
                    f"time (target < {target:.0f} s: {'ok' if latency < target else 'MISSED'}); "
                    f"with it {med['total']:.2f} s = wait {med['wait']:.2f} + infer "
                    f"{med['infer']:.2f} + send {med['send']:.2f}; runs: "
                    + ", ".join(f"{run.total - args.stable:.2f}" for run in runs)
                )
                if args.mpps:
                    by_mpps = [
                        one_run(node, orthanc, study, mpps=True) for study in paths[args.runs :]
                    ]
                    print(
                        f"{name:10} last image -> last result in Orthanc, median: completed by "
                        f"MPPS {statistics.median(r.total for r in by_mpps):.2f} s (wait "
                        f"{statistics.median(r.wait for r in by_mpps):.2f}), by the stable time "
                        f"{med['total']:.2f} s (wait {med['wait']:.2f}); MPPS runs: "
                        + ", ".join(f"{r.total:.2f}" for r in by_mpps)
                    )
        finally:
            node.stop()
            orthanc.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
