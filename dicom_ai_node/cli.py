"""The ``dicom-ai-node`` command: serve, send, run, export, jobs, models, synth, train,
evaluate, demo."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy import select

from dicom_ai_node import cli_ml, cli_pull
from dicom_ai_node.config import ROLES, ConfigError, Role, Settings, load_settings
from dicom_ai_node.demo import demo
from dicom_ai_node.jobs.crashes import record_crashes
from dicom_ai_node.jobs.db import SchemaTooNewError

if TYPE_CHECKING:
    from collections.abc import Callable

    from dicom_ai_node.node import Node
    from dicom_ai_node.supervisor import ChildSpec

app = typer.Typer(
    help="A DICOM node that runs a CNN classifier on received studies.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
jobs_app = typer.Typer(help="Inspect and retry jobs in the job log.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(cli_ml.models_app, name="models")
app.command("synth")(cli_ml.synth)
app.command("train")(cli_ml.train)
app.command("evaluate")(cli_ml.evaluate)
app.command("demo")(demo)
app.command("run")(cli_pull.run)
app.command("export")(cli_pull.export)

console = Console()
err = Console(stderr=True, soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Configuration file (default: $DICOM_AI_NODE_CONFIG, else config/node.toml).",
    ),
]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from None


class _JsonLines(logging.Formatter):
    """One JSON object per record; ``job_id`` and ``association_id`` are fields of their own
    where the stages pass them (``extra=``), so a log shipper can group by them; ``process``
    names the process of ``serve``."""

    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.process:
            entry["process"] = self.process
        for field in ("job_id", "association_id"):
            if (value := getattr(record, field, None)) is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(settings: Settings, process: str = "") -> None:
    """Log to stderr; ``process`` (``supervisor``, ``work-0``...) names the process of
    ``serve`` each line comes from."""
    handler: logging.Handler
    tag = f"[{process}] " if process else ""
    if settings.logging.json_lines:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonLines(process))
    elif err.is_terminal:
        handler = RichHandler(console=err, show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter(f"{tag}%(message)s"))
    else:  # a service manager's log: one plain line per record
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")
        )
    logging.basicConfig(level=settings.logging.level, handlers=[handler], force=True)
    # pynetdicom logs every PDU at INFO; its warnings and errors are what an operator needs.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # a line per module copied


RoleOption = Annotated[
    list[str] | None,
    typer.Option(
        "--role",
        "-r",
        help=f"Run only this role on this host (repeatable): {', '.join(ROLES)}. Default: all.",
    ),
]


def _stop_on_signals(log: logging.Logger, *signals: signal.Signals) -> threading.Event:
    """An event set by the first of ``signals`` (installed before anything listens: a stop
    during start-up stops cleanly too)."""
    stop = threading.Event()

    def _signal(signum: int, _frame: Any) -> None:
        log.info("stopping (%s)", signal.Signals(signum).name)
        stop.set()

    for sig in signals:
        signal.signal(sig, _signal)
    return stop


@app.command()
def serve(config: ConfigOption = None, role: RoleOption = None) -> None:
    """Run the node: listen for DICOM, process studies, send results, until Ctrl-C.

    A supervisor runs each role in processes of its own (``[processes]``), restarts those
    that die and, on SIGTERM or Ctrl-C, drains them in order.
    """
    from dicom_ai_node.supervisor import Supervisor

    settings = _settings(config)
    roles = tuple(role or ROLES)
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        err.print(f"[red]unknown role:[/red] {', '.join(unknown)} (roles: {', '.join(ROLES)})")
        raise typer.Exit(2)
    _setup_logging(settings, "supervisor")
    log = logging.getLogger("dicom_ai_node")
    stop = _stop_on_signals(log, signal.SIGINT, signal.SIGTERM)
    supervisor = Supervisor(settings, cast(tuple[Role, ...], roles), run_child)
    try:
        code = supervisor.run(stop)
    except (OSError, SchemaTooNewError) as exc:
        err.print(f"[red]cannot start:[/red] {exc}")
        raise typer.Exit(1) from None
    log.info("stopped")
    raise typer.Exit(code)


def run_child(spec: ChildSpec) -> None:
    """One process of ``serve``, forked by its supervisor's fork server: runs ``spec.role``
    until SIGTERM; exits 2 (``CONFIG_ERROR``) if it cannot run with the configuration."""
    try:
        _child(spec)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)


def _child(spec: ChildSpec) -> None:
    from dicom_ai_node.node import Node
    from dicom_ai_node.processes import ProcessStatus
    from dicom_ai_node.supervisor import CONFIG_ERROR, become_child, report_ready

    become_child(spec)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor says when to stop
    settings = spec.settings
    _setup_logging(settings, f"{spec.role}-{spec.slot}")
    log = logging.getLogger("dicom_ai_node")
    stop = _stop_on_signals(log, signal.SIGTERM)
    status = ProcessStatus(settings.storage.data_dir, settings.node_name)
    if spec.role == "work":  # before any model loads: TensorFlow fixes its pools at its first op
        from dicom_ai_node.infer.runtime import configure_threads

        configure_threads(settings.worker.inference_threads)
        # Linux keeps a niceness per thread: set here, before TensorFlow's pools, every thread
        # the worker starts inherits it. A service started nicer than this stays so.
        niceness = max(settings.worker.nice, os.getpriority(os.PRIO_PROCESS, 0))
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    try:
        node = Node(settings, roles=(spec.role,), listener=spec.listener, status=status)
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(CONFIG_ERROR) from None
    with record_crashes(settings.storage.data_dir, node.owner):
        _run(node, settings, stop, log, lambda: report_ready(spec))


def _run(
    node: Node,
    settings: Settings,
    stop: threading.Event,
    log: logging.Logger,
    report_ready: Callable[[], None],
) -> None:
    """Start the node's roles, tell the supervisor they are ready, wait for a stop signal,
    stop them."""
    try:
        node.start()
    except ConfigError as exc:
        node.stop()  # what had started already
        err.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from None
    except (OSError, SchemaTooNewError) as exc:
        node.stop()
        err.print(f"[red]cannot start:[/red] {exc}")
        raise typer.Exit(1) from None
    if "web" in node.roles:
        if node.http.token_generated:
            # Printed, not logged, so the token stays out of shipped logs.
            err.print(f"dashboard: {node.http.login_url}")
        else:
            log.info("dashboard: %s", node.http.url)
    if "receive" in node.roles:
        log.info("DICOM %s@%s:%d", settings.dicom.ae_title, settings.dicom.bind, node.scp.port)
    if "work" in node.roles:
        log.info("models: %s", ", ".join(sorted(node.models)) or "none")
    report_ready()
    stop.wait()
    node.stop()
    log.info("stopped")


def _files(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            err.print(f"[red]no such file or folder:[/red] {path}")
            raise typer.Exit(2)
    return found


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (recursive).")],
    host: Annotated[str, typer.Option(help="Peer host.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Peer port.")] = 11112,
    aet: Annotated[str, typer.Option(help="Peer (called) AE title.")] = "AINODE",
    calling_aet: Annotated[str, typer.Option(help="Our (calling) AE title.")] = "AINODE-SEND",
    timeout: Annotated[float, typer.Option(help="Network timeout, seconds.")] = 30.0,
) -> None:
    """Send DICOM files to a node or PACS by C-STORE, with a progress bar."""
    from dicom_ai_node.dispatch.scu import Peer, SendOutcome, send_files

    files = _files(paths)
    if not files:
        err.print("nothing to send")
        raise typer.Exit(2)
    failed: list[SendOutcome] = []
    with Progress(
        TextColumn("sending"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
    ) as progress:
        task = progress.add_task("send", total=len(files))

        def sent(outcome: SendOutcome) -> None:
            progress.advance(task)
            if not outcome.ok:
                failed.append(outcome)

        send_files(files, Peer(aet, host, port, calling_aet), timeout=timeout, on_sent=sent)
    for outcome in failed:
        status = f"0x{outcome.status:04X}" if outcome.status is not None else "not sent"
        err.print(f"[red]failed[/red] {outcome.path}: {status} {outcome.error}")
    console.print(f"sent {len(files) - len(failed)} of {len(files)} files to {aet}@{host}:{port}")
    if failed:
        raise typer.Exit(1)


def _job_dict(job: Any) -> dict[str, Any]:
    return {
        "id": job.id,
        "level": job.level,
        "study_instance_uid": job.study_instance_uid,
        "series_instance_uid": job.series_instance_uid,
        "generation": job.generation,
        "modality": job.modality,
        "route": job.route,
        "model": job.model,
        "model_version": job.model_version,
        "state": job.state,
        "priority": job.priority,
        "attempts": job.attempts,
        "label": job.label,
        "probability": job.probability,
        "positive": job.positive,
        "error": job.error,
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def _db(config: Path | None, *, write: bool = False) -> Any:
    from dicom_ai_node.jobs.db import create_db_engine, read_only, session_factory, upgrade

    settings = _settings(config)
    engine = create_db_engine(settings.database_url, settings.database.busy_timeout_ms)
    upgrade(engine)
    return session_factory(engine if write else read_only(engine))


@jobs_app.command("list")
def jobs_list(
    config: ConfigOption = None,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List jobs, newest first."""
    from dicom_ai_node.jobs.models import Job, JobState

    if state is not None and state not in {s.value for s in JobState}:
        err.print(f"unknown state {state!r}; states: {', '.join(s.value for s in JobState)}")
        raise typer.Exit(2)
    with _db(config)() as session:
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if state:
            query = query.where(Job.state == state)
        jobs = session.scalars(query).all()
    if as_json:
        print(json.dumps([_job_dict(job) for job in jobs], indent=1))
        return
    table = Table(
        "id",
        "state",
        "prio",
        "modality",
        "route",
        "model",
        "label",
        "prob.",
        "series / study",
        "updated",
    )
    for job in jobs:
        table.add_row(
            str(job.id),
            job.state,
            str(job.priority),
            job.modality,
            job.route or "-",
            job.model or "-",
            job.label or (job.error or "")[:40],
            f"{job.probability:.3f}" if job.probability is not None else "",
            (job.series_instance_uid or job.study_instance_uid)[-24:],
            f"{job.updated_at:%Y-%m-%d %H:%M:%S}",
        )
    console.print(table)


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[int, typer.Argument(help="Job id.")],
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one job with its events, predictions and deliveries."""
    from dicom_ai_node.jobs.models import Delivery, Event, Job, Result

    with _db(config)() as session:
        job = session.get(Job, job_id)
        if job is None:
            err.print(f"no job {job_id}")
            raise typer.Exit(1)
        events = session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id))
        results = session.scalars(select(Result).where(Result.job_id == job_id)).all()
        deliveries = session.scalars(select(Delivery).where(Delivery.job_id == job_id)).all()
        data = _job_dict(job)
        data["events"] = [
            {"at": e.at.isoformat(), "kind": e.kind, "message": e.message} for e in events
        ]
        data["results"] = [
            {"kind": r.kind, "sop_instance_uid": r.sop_instance_uid, "path": r.path}
            for r in results
        ]
        data["deliveries"] = [
            {
                "destination": d.destination,
                "result": d.result_uid,
                "state": d.state,
                "attempts": d.attempts,
                "last_status": d.last_status,
                "last_error": d.last_error,
            }
            for d in deliveries
        ]
    if as_json:
        print(json.dumps(data, indent=1))
        return
    for key, value in data.items():
        if key not in ("events", "results", "deliveries"):
            console.print(f"[bold]{key}[/bold]: {value}")
    for section in ("results", "deliveries", "events"):
        if data[section]:
            console.print(f"[bold]{section}[/bold]:")
            for item in data[section]:
                console.print("  " + "  ".join(str(v) for v in item.values()))


@jobs_app.command("retry")
def jobs_retry(
    job_id: Annotated[int, typer.Argument(help="Job id.")],
    config: ConfigOption = None,
) -> None:
    """Run a failed job again, or re-send the results of one that failed to deliver."""
    from dicom_ai_node.jobs.queue import retry_job

    with _db(config, write=True).begin() as session:
        try:
            outcome = retry_job(session, job_id)
        except (LookupError, ValueError) as exc:
            err.print(str(exc))
            raise typer.Exit(1) from None
    if outcome.action == "resend":
        console.print(f"job {job_id}: {outcome.deliveries} deliveries queued again")
    else:
        console.print(f"job {job_id} queued again")
