"""De-identified export: no identifying value of the source survives anywhere in an exported
file (file meta, private tags and sequences included), UIDs are replaced consistently, the
map stays in the job log, dciodvfy finds nothing new, `train` reads the layout, and the class
folders and labels.csv follow the radiologists' latest feedback."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.export import confirmed_label
from dicom_ai_node.infer.runtime import read_cards
from dicom_ai_node.jobs.db import create_db_engine, session_factory, upgrade
from dicom_ai_node.jobs.models import Event, Feedback, Job, Pseudonym, utcnow
from dicom_ai_node.receive.ingest import Ingest
from dicom_ai_node.spool import Spool
from dicom_ai_node.train.data import class_files
from tests.support.helpers import instance, make_settings, write
from tests.support.validators import dciodvfy_errors

pytestmark = pytest.mark.peers  # dciodvfy

ROUTE = "head-ct"
MODEL = "head-ct-hemorrhage-demo"
WEIGHTS = "ab" * 32
IDENTIFIERS = {
    "PatientName": "Doe^Jane^Q",
    "PatientID": "PID-4711",
    "OtherPatientIDs": "OTHER-0815",
    "PatientBirthDate": "19700304",
    "AccessionNumber": "ACC-99887",
    "InstitutionName": "Saint Example Hospital",
    "ReferringPhysicianName": "House^Gregory",
    "OperatorsName": "Tech^Tina",
    "StationName": "CTSCANNER7",
}


def source_series(folder: Path, count: int, burned_in: str = "NO") -> list[Dataset]:
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    images = []
    for _ in range(count):
        ds = instance("CT_small.dcm", study=study, series=series)
        for keyword, value in IDENTIFIERS.items():
            setattr(ds, keyword, value)
        ds.FrameOfReferenceUID = frame
        ds.BurnedInAnnotation = burned_in
        ds.SeriesDescription = "Head axial Doe PID-4711"
        ds.StudyDescription = "CT HEAD for Jane Doe"
        block = ds.private_block(0x0011, "ACME 1.0", create=True)
        block.add_new(0x01, "LO", "Jane Doe PID-4711")
        write(ds, folder)
        images.append(ds)
    return images


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[Dataset]]]:
    """A job log with four finished jobs (one series each, one with burned-in text; the
    radiologist agrees with the first and, after first agreeing, disagrees with the last),
    exported twice by the command line; the first series' images are yielded."""
    root = tmp_path_factory.mktemp("export")
    settings = make_settings(root)
    engine = create_db_engine(settings.database_url)
    upgrade(engine)
    ingest = Ingest(Spool(settings.storage.data_dir), engine, max_instance_bytes=2**30)
    clean, other = source_series(root / "src", 2), source_series(root / "src", 1)
    burned = source_series(root / "src", 1, "YES")
    flipped = source_series(root / "src", 1)
    for ds in clean + other + burned + flipped:
        data = write(ds, root / "src").read_bytes()
        assert ingest.store(data, association_id=None, calling_ae_title="CT").ok
    sessions: sessionmaker[Session] = session_factory(engine)
    with sessions.begin() as session:
        jobs: tuple[tuple[Dataset, str, list[bool]], ...] = (
            (clean[0], "hemorrhage", [True]),
            (other[0], "normal", []),
            (burned[0], "normal", []),
            (flipped[0], "hemorrhage", [True, False]),
        )
        for ds, label, opinions in jobs:
            job = Job(
                study_instance_uid=ds.StudyInstanceUID,
                series_instance_uid=ds.SeriesInstanceUID,
                route=ROUTE,
                model=MODEL,
                model_version="0.1.0",
                weights_sha256=WEIGHTS,
                state="done",
                label=label,
                probability=0.75,
                finished_at=utcnow(),
            )
            session.add(job)
            session.flush()
            for agree in opinions:
                session.add(Feedback(job_id=job.id, agree=agree, author="House^Gregory"))
                session.flush()
    config = root / "node.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{settings.storage.data_dir}"\nmin_free_mb = 0\n'
        f'[[routes]]\nname = "{ROUTE}"\nmodel = "{MODEL}"\n'
    )
    day = f"{utcnow() - timedelta(days=1):%Y-%m-%d}"
    for out in ("out", "again"):
        args = ["--deidentify", "--route", ROUTE, "--since", day, "--config", str(config)]
        result = subprocess.run(
            [sys.executable, "-m", "dicom_ai_node", "export", *args, str(root / out)],
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": "200"},
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert "exported 4 images" in result.stdout, result.stdout
        assert "labels of 3 series" in result.stdout
        assert "Burned In Annotation is YES" in result.stderr
    yield root, clean
    engine.dispose()


def files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


def texts(ds: Dataset) -> Iterator[str]:
    """Every value of every element (sequences, private tags), as text."""
    for element in ds.iterall():
        if element.tag == 0x7FE00010:
            continue  # pixel data: bytes, not text
        value = element.value
        if isinstance(value, bytes):
            yield value.decode("latin-1")
        elif element.VR != "SQ":
            yield str(value)


_DIGITS_AND_DOTS = re.compile(r"^[0-9.]+$")


def leaks(secret: str, text: str) -> bool:
    """Whether ``text`` carries ``secret``. A value of digits and dots (a UID, a pseudonymous
    one included) leaks only by being the secret itself: a fresh random UID may well contain
    the digits of an ID by chance; any other text leaks by containing it."""
    base = Path(text).stem if text.endswith(".dcm") else text
    if _DIGITS_AND_DOTS.match(base):
        return base == secret
    return secret.lower() in text.lower()


def test_no_identifier_of_the_source_survives(exported: tuple[Path, list[Dataset]]) -> None:
    root, clean = exported
    secrets = {value for value in IDENTIFIERS.values()} | {"Doe", "Jane", "4711", "Gregory"}
    for ds in clean:
        secrets |= {
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            ds.SOPInstanceUID,
            ds.FrameOfReferenceUID,
        }
    out = files(root / "out")
    assert len(out) == 4
    with (root / "out" / "labels.csv").open(encoding="utf-8", newline="") as f:
        cells = [cell for row in csv.reader(f) for cell in row]
    for secret in secrets:
        found = [cell for cell in cells if leaks(secret, cell)]
        assert not found, f"{secret!r} survives in labels.csv: {found}"
    for path in out:
        ds = dcmread(path)
        everything = [*texts(ds), *texts(ds.file_meta), *path.relative_to(root).parts]
        for secret in secrets:
            found = [text for text in everything if leaks(secret, text)]
            assert not found, f"{secret!r} survives in {path.name}: {found}"
        assert not [element for element in ds if element.tag.is_private]
        assert ds.PatientIdentityRemoved == "YES"
        assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == [
            "113100",
            "113106",
            "113105",
        ]
        assert ds.BurnedInAnnotation == "NO"
        assert ds.StudyDate == clean[0].StudyDate  # longitudinal temporal information kept
        assert ds.SeriesDescription == "Head axial"  # cleaned, not dropped


def test_uids_replaced_consistently_and_mapped_in_the_job_log(
    exported: tuple[Path, list[Dataset]],
) -> None:
    root, clean = exported
    first = [dcmread(p) for p in files(root / "out" / "hemorrhage")]
    again = [dcmread(p) for p in files(root / "again" / "hemorrhage")]
    assert len({ds.SeriesInstanceUID for ds in first}) == 1
    assert len({ds.SOPInstanceUID for ds in first}) == 2
    assert [ds.SOPInstanceUID for ds in first] == [ds.SOPInstanceUID for ds in again]
    assert first[0].FrameOfReferenceUID != clean[0].FrameOfReferenceUID
    engine = create_db_engine(make_settings(root).database_url)
    with session_factory(engine)() as session:
        mapped = {
            row.original: row.pseudonym
            for row in session.scalars(select(Pseudonym).where(Pseudonym.kind == "uid"))
        }
        assert mapped[clean[0].SeriesInstanceUID] == first[0].SeriesInstanceUID
        assert session.scalars(select(Event).where(Event.kind == "exported")).all()
    engine.dispose()


def test_dciodvfy_finds_no_new_errors(exported: tuple[Path, list[Dataset]]) -> None:
    root, clean = exported
    source_errors = set(dciodvfy_errors(next((root / "src").glob(f"{clean[0].SOPInstanceUID}*"))))
    for path in files(root / "out"):
        assert set(dciodvfy_errors(path)) - source_errors == set()


def test_train_reads_the_layout(exported: tuple[Path, list[Dataset]]) -> None:
    root, _ = exported
    _, card = read_cards()[MODEL]
    by_label = class_files(root / "out", card)
    names = [label.name for label in card.labels]
    assert {names[i]: len(paths) for i, paths in by_label.items()} == {
        "hemorrhage": 2,
        "normal": 2,
    }


def test_labels_follow_the_latest_feedback(exported: tuple[Path, list[Dataset]]) -> None:
    root, clean = exported
    with (root / "out" / "labels.csv").open(encoding="utf-8", newline="") as labels_file:
        rows = list(csv.DictReader(labels_file))
    assert len(rows) == 3  # the burned-in series exported nothing
    by_folder = {
        path.parent.name: path.parts[-4] for path in files(root / "out")
    }  # pseudonymous series UID -> class folder
    assert {row["series_instance_uid"]: row["label"] for row in rows} == by_folder
    assert sorted((r["model_label"], r["feedback"], r["label"]) for r in rows) == [
        ("hemorrhage", "agree", "hemorrhage"),
        ("hemorrhage", "disagree", "normal"),
        ("normal", "none", "normal"),
    ]
    first = dcmread(files(root / "out" / "hemorrhage")[0])
    row = next(r for r in rows if r["series_instance_uid"] == first.SeriesInstanceUID)
    assert row["study_instance_uid"] == first.StudyInstanceUID
    assert (row["model"], row["model_version"], row["weights_sha256"]) == (MODEL, "0.1.0", WEIGHTS)
    assert float(row["probability"]) == 0.75
    assert clean[0].SeriesInstanceUID not in by_folder


def test_confirmed_label() -> None:
    two = ("normal", "hemorrhage")
    assert confirmed_label("hemorrhage", None, two) == "hemorrhage"
    assert confirmed_label("hemorrhage", True, two) == "hemorrhage"
    assert confirmed_label("hemorrhage", False, two) == "normal"
    assert confirmed_label("a", False, ("a", "b", "c")) is None  # not b, not c: unknown
