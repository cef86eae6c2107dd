"""``dicom-ai-node demo``: the whole node on synthetic studies, offline, in under a minute.

Starts a node in this process (loopback, a free port unless ``--port``, data in a temporary
folder unless ``--data-dir``) with the shipped routes and the bundled demo models, makes a
positive and a negative synthetic study for each demo task, sends them to the node over DICOM
with the node's own C-STORE SCU, and prints each result as it comes back: the finding, its
probability, the result objects and where they are (the outbox, and the PACS given with
``--pacs AET@host:port``). Then it stops the node.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from sqlalchemy import select

from dicom_ai_node.config import ConfigError, Settings
from dicom_ai_node.synth import Label, Task, generate_studies

# The routes of config/node.toml as shipped (tests/test_demo.py keeps them in step).
DEMO_ROUTES: list[dict[str, Any]] = [
    {
        "name": "chest-radiograph",
        "model": "cxr-opacity-demo",
        "where": {"Modality": ["CR", "DX"], "BodyPartExamined": ["CHEST"]},
        "outputs": ["sr", "sc"],
        "priority": 10,
    },
    {
        "name": "head-ct",
        "model": "head-ct-hemorrhage-demo",
        "where": {"Modality": ["CT"], "BodyPartExamined": ["HEAD", "BRAIN"]},
        "outputs": ["sr", "sc", "kos"],
        "priority": 20,
    },
]
FINISHED = ("done", "failed", "failed_to_deliver", "skipped")
_PACS = re.compile(r"^(?P<aet>[^@\\]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class PacsAddress:
    """A PACS given as ``AET@host:port``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> PacsAddress:
        """Parse ``AET@host:port``; raises ``ValueError`` with the expected form."""
        match = _PACS.match(text.strip())
        if match is None or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"{text!r} is not AET@host:port (for example ORTHANC@127.0.0.1:4242)")
        return cls(match["aet"].strip(), match["host"], int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def demo_settings(data_dir: Path, port: int, pacs: PacsAddress | None) -> Settings:
    """Settings of the demo node: loopback only, quick timers, results to the outbox
    (and to ``pacs``, retried a few times only, so a wrong address shows at once)."""
    destinations = ["outbox"]
    extra: dict[str, Any] = {}
    if pacs is not None:
        destinations.append("pacs")
        extra["destinations"] = [
            {"name": "pacs", "ae_title": pacs.ae_title, "host": pacs.host, "port": pacs.port}
        ]
    return Settings.model_validate(
        {
            "node_name": "demo",
            "dicom": {"ae_title": "AINODE", "bind": "127.0.0.1", "port": port},
            "storage": {"data_dir": data_dir, "min_free_mb": 0},
            "http": {"bind": "127.0.0.1", "port": 0},
            "assemble": {"stable_seconds": 1.0, "poll_seconds": 0.1},
            "worker": {"poll_seconds": 0.1},
            "dispatch": {
                "poll_seconds": 0.2,
                "retry_base_seconds": 0.5,
                "retry_max_seconds": 2,
                "max_attempts": 4,
                "timeout": 10,
            },
            "routes": [{**route, "destinations": destinations} for route in DEMO_ROUTES],
            **extra,
        }
    )


def _short(uid: str) -> str:
    """The end of a UID, enough to tell the demo's studies apart."""
    return f"…{uid[-8:]}"


def _table() -> Table:
    table = Table(title="dicom-ai-node demo: results")
    for column in ("Study", "Modality", "Model", "Label", "Probability", "Results", "Where"):
        table.add_column(column, no_wrap=column != "Where")
    return table


def demo(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir", help="Keep the node's data here (default: a new temporary folder)."
        ),
    ] = None,
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="DICOM port of the node (0 = free).")
    ] = 0,
    pacs: Annotated[
        str | None,
        typer.Option("--pacs", help="Also send the results to this PACS: AET@host:port."),
    ] = None,
    slices: Annotated[int, typer.Option("--slices", min=1, help="CT slices per study.")] = 16,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Give up after this many seconds.")
    ] = 120,
) -> None:
    """Run the node on synthetic studies (a positive and a negative one per demo model) and
    show what it finds and where the results go. Offline; under a minute."""
    console = Console()
    if not console.is_terminal:  # a log or a pipe: do not squeeze the table into 80 columns
        console = Console(width=120)
    try:
        address = PacsAddress.parse(pacs) if pacs else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--pacs") from None
    root = data_dir or Path(tempfile.mkdtemp(prefix="dicom-ai-node-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    logger = logging.getLogger("dicom_ai_node")
    level = logger.level
    logger.setLevel(logging.WARNING)  # the table says it all; restored afterwards
    try:
        _run(console, root, port, address, slices, timeout)
    finally:
        logger.setLevel(level)


def _run(
    console: Console,
    root: Path,
    port: int,
    address: PacsAddress | None,
    slices: int,
    timeout: float,
) -> None:
    """Start the node, send the studies, show the results, stop the node."""
    from dicom_ai_node.dispatch.scu import Peer, send_files
    from dicom_ai_node.jobs.models import Delivery, Job, Result
    from dicom_ai_node.node import Node

    started = time.monotonic()
    with console.status("loading the demo models and starting the node"):
        try:
            node = Node(demo_settings(root / "var", port, address))
            node.start()
        except (ConfigError, OSError) as exc:
            console.print(f"[red]cannot start the node:[/red] {exc}")
            raise typer.Exit(1) from None
    try:
        console.print(
            f"node AINODE listening on 127.0.0.1:{node.scp.port}, data in {root}"
            + (f", results also to {address}" if address else "")
        )
        studies: dict[str, tuple[Task, Label]] = {}
        for task in Task:
            for label in (Label.POSITIVE, Label.NEGATIVE):
                folder = root / "studies" / f"{task.value}-{label.value}"
                study = generate_studies(task, label, 1, folder, seed=2024, slices=slices)[0]
                studies[study.name] = (task, label)
                paths = sorted(study.rglob("*.dcm"))
                outcomes = send_files(
                    paths, Peer("AINODE", "127.0.0.1", node.scp.port, calling_ae_title="DEMO")
                )
                sent = sum(outcome.ok for outcome in outcomes)
                console.print(
                    f"sent {task.value} {label.value}: {sent}/{len(paths)} images, "
                    f"study {_short(study.name)}"
                )
        console.print(f"results are written under {node.spool.outbox}")
        table = _table()
        shown: set[str] = set()
        deadline = started + timeout
        with Live(table, console=console, refresh_per_second=4):
            while len(shown) < len(studies) and time.monotonic() < deadline:
                with node.read_sessions() as session:
                    jobs = session.scalars(
                        select(Job).where(Job.study_instance_uid.in_(studies)).order_by(Job.id)
                    ).all()
                    for job in jobs:
                        if job.state not in FINISHED or job.study_instance_uid in shown:
                            continue
                        shown.add(job.study_instance_uid)
                        results = session.scalars(
                            select(Result).where(Result.job_id == job.id)
                        ).all()
                        deliveries = session.scalars(
                            select(Delivery).where(Delivery.job_id == job.id)
                        ).all()
                        kinds = ", ".join(sorted(r.kind.upper() for r in results)) or "-"
                        short = _short(job.study_instance_uid)
                        where = [f"outbox/{short}/"]
                        if address is not None:
                            ok = sum(d.state == "done" for d in deliveries)
                            where.append(f"PACS: {ok}/{len(deliveries)} sent")
                        probability = (
                            f"{job.probability:.3f}" if job.probability is not None else "-"
                        )
                        finding = job.label or job.state
                        if job.state != "done":
                            finding = f"{finding} ({job.state})"
                        table.add_row(
                            f"{short}\n{studies[job.study_instance_uid][1].value}",
                            job.modality,
                            job.model or "-",
                            finding,
                            probability,
                            kinds,
                            "\n".join(where),
                        )
                time.sleep(0.2)
        if not console.is_terminal:
            console.line()
        missing = len(studies) - len(shown)
        with node.read_sessions() as session:
            states = list(
                session.scalars(select(Job.state).where(Job.study_instance_uid.in_(studies)))
            )
    finally:
        node.stop()
    elapsed = time.monotonic() - started
    if missing:
        console.print(f"[red]{missing} studies got no result within {timeout:.0f} s[/red]")
        raise typer.Exit(1)
    if any(state != "done" for state in states):
        console.print("[red]some jobs did not finish cleanly; see the Label column[/red]")
        raise typer.Exit(1)
    console.print(
        f"{len(studies)} studies processed in {elapsed:.1f} s; results in {node.spool.outbox}"
    )
