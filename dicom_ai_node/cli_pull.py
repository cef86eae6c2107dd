"""``dicom-ai-node run`` (pull studies from a configured source into the node, Query/Retrieve)
and ``dicom-ai-node export`` (de-identified training data out of it)."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from sqlalchemy import Engine

from dicom_ai_node.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from dicom_ai_node.audit.trail import AuditTrail
    from dicom_ai_node.receive.ingest import Ingest
    from dicom_ai_node.retrieve import Retrieved

console = Console()
err = Console(stderr=True, soft_wrap=True)


def _job_log(config: Path | None) -> tuple[Settings, Engine]:
    """The settings and the migrated job log; a configuration error exits with status 2."""
    from dicom_ai_node.jobs.db import create_db_engine, upgrade

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from None
    engine = create_db_engine(settings.database_url, settings.database.busy_timeout_ms)
    upgrade(engine)
    return settings, engine


def run(
    route: Annotated[str, typer.Option(help="The route the studies are pulled for.")],
    study: Annotated[
        str | None, typer.Option(help="Study Instance UID to retrieve.", show_default=False)
    ] = None,
    since: Annotated[
        datetime | None,
        typer.Option(help="Retrieve the studies of this date or later.", formats=["%Y-%m-%d"]),
    ] = None,
    modality: Annotated[
        str | None, typer.Option(help="With --since: only studies with this modality.")
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="The [[sources]] name (default: the first).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Configuration file.")
    ] = None,
) -> None:
    """Query a PACS for studies and retrieve them into the node (C-FIND, then C-MOVE to the
    node's listener or C-GET); the running node completes and routes them as it does any
    study it is sent."""
    from dicom_ai_node.audit.trail import AuditTrail
    from dicom_ai_node.jobs.db import session_factory
    from dicom_ai_node.receive.ingest import Ingest
    from dicom_ai_node.spool import Spool

    if (study is None) == (since is None):
        err.print("[red]give either --study UID or --since DATE[/red]")
        raise typer.Exit(2)
    settings, engine = _job_log(config)
    ingest = Ingest(
        Spool(settings.storage.data_dir, settings.node_name),
        engine,
        max_instance_bytes=int(settings.dicom.max_instance_mb * 2**20),
        min_free_bytes=settings.storage.min_free_mb * 2**20,
    )
    audit = AuditTrail(session_factory(engine), settings.audit, settings.node_name)
    audit.start()  # the queries and C-GETs of this command are audited like the node's
    try:
        failed = _pull(settings, engine, ingest, audit, route, study, since, modality, source)
    finally:
        audit.stop()
        engine.dispose()
    if failed:
        raise typer.Exit(1)


def _pull(
    settings: Settings,
    engine: Engine,
    ingest: Ingest,
    audit: AuditTrail,
    route: str,
    study: str | None,
    since: datetime | None,
    modality: str | None,
    source: str | None,
) -> list[Retrieved]:
    """Query the source and retrieve what matched, with a progress bar; the failed ones."""
    from dicom_ai_node.retrieve import RetrieveError, Sources, retrieve_studies

    sources = Sources(
        tuple(settings.sources),
        frozenset(r.name for r in settings.routes),
        settings.dicom.ae_title,
        ingest,
        audit,
    )
    try:
        retriever = sources.retriever(route, source)
    except LookupError as exc:
        err.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from None
    pacs = retriever.source.name
    day: date | None = since.date() if since else None
    try:
        matches = retriever.find(study, day, modality)
    except RetrieveError as exc:
        err.print(f"[red]{pacs}:[/red] {exc}")
        raise typer.Exit(1) from None
    if not matches:
        what = f"study {study}" if study else f"study since {day}"
        err.print(f"[red]{pacs} holds no {what}{f' with {modality}' if modality else ''}[/red]")
        raise typer.Exit(1)
    failed: list[Retrieved] = []
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=err
    ) as progress:
        tasks: dict[str, TaskID] = {
            m.study_instance_uid: progress.add_task(m.study_instance_uid[-24:], total=m.instances)
            for m in matches
        }

        def advanced(uid: str, done: int, total: int) -> None:
            progress.update(tasks[uid], completed=done, total=total)

        def finished(outcome: Retrieved) -> None:
            done = outcome.completed + outcome.warning
            progress.update(tasks[outcome.study_instance_uid], completed=done)
            if not outcome.ok:
                failed.append(outcome)

        retrieve_studies(retriever, matches, route, engine, advanced, finished)
    for outcome in failed:
        err.print(f"[red]failed[/red] {outcome.study_instance_uid}: {outcome.error}")
    console.print(f"retrieved {len(matches) - len(failed)} of {len(matches)} studies from {pacs}")
    return failed


def export(
    out: Annotated[Path, typer.Argument(help="Folder to write (class sub-folders).")],
    route: Annotated[str, typer.Option(help="Export the images of this route's jobs.")],
    since: Annotated[
        datetime, typer.Option(help="Jobs finished on this date or later.", formats=["%Y-%m-%d"])
    ],
    deidentify: Annotated[
        bool, typer.Option("--deidentify", help="Required: exports are always de-identified.")
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Configuration file.")
    ] = None,
) -> None:
    """Write the received images of a route's finished jobs, de-identified (PS3.15 Annex E
    Basic Profile, Retain Longitudinal Temporal Information, Clean Descriptors), into
    OUT/<label>/, the layout `train --data OUT` reads, labelled by the radiologists' feedback
    where there is some, with OUT/labels.csv; the pseudonym map stays in the job log."""
    from datetime import UTC

    from dicom_ai_node.export import LABELS_FILE, export_jobs
    from dicom_ai_node.infer.runtime import read_cards
    from dicom_ai_node.jobs.db import session_factory
    from dicom_ai_node.spool import Spool

    if not deidentify:
        err.print("[red]exports carry no identities: pass --deidentify[/red]")
        raise typer.Exit(2)
    settings, engine = _job_log(config)
    if route not in {r.name for r in settings.routes}:
        err.print(f"[red]configuration error:[/red] routes: no route named {route!r}")
        raise typer.Exit(2)
    model_labels = {
        name: [label.name for label in card.labels]
        for name, (_, card) in read_cards(settings.models.dirs).items()
    }
    with Progress(TextColumn("exporting"), BarColumn(), MofNCompleteColumn(), console=err) as bar:
        task = bar.add_task("export", total=None)
        with session_factory(engine).begin() as session:
            done = export_jobs(
                session,
                Spool(settings.storage.data_dir, settings.node_name),
                route,
                since.replace(tzinfo=UTC),
                out,
                model_labels,
                lambda n: bar.advance(task, n),
            )
    engine.dispose()
    for sop, why in done.skipped.items():
        err.print(f"[yellow]left out[/yellow] {sop}: {why}")
    labels = ", ".join(f"{label} {count}" for label, count in sorted(done.files.items()))
    console.print(
        f"exported {sum(done.files.values())} images to {out} ({labels or 'none'}), "
        f"labels of {done.series} series in {out / LABELS_FILE}"
    )
