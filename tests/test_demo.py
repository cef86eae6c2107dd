"""`dicom-ai-node demo`: the node on synthetic studies, results to the outbox and a PACS."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

import pytest
import typer
from pydicom import dcmread
from typer.testing import CliRunner

from dicom_ai_node.demo import DEMO_ROUTES, PacsAddress, demo
from tests.support.helpers import ROOT, free_port, storescp

pytestmark = pytest.mark.peers


def app() -> typer.Typer:
    """The demo command on its own app, as cli.py registers it."""
    app = typer.Typer()
    app.command("demo")(demo)
    app.command("other")(lambda: None)  # two commands, so `demo` is invoked by name
    return app


def test_demo_runs_every_study_and_sends_results_to_the_pacs(tmp_path: Path) -> None:
    port = free_port()
    with storescp(port, tmp_path / "pacs", aet="PACS") as received:
        run = CliRunner().invoke(
            app(),
            ["demo", "--data-dir", str(tmp_path / "demo"), "--pacs", f"PACS@127.0.0.1:{port}"],
        )
        files = sorted(received.iterdir())
    assert run.exit_code == 0, run.output
    assert "4 studies processed" in run.output
    for expected in ("cxr-opacity-demo", "head-ct-hemorrhage-demo", "opacity", "hemorrhage"):
        assert expected in run.output
    assert run.output.count("normal") == 2  # the two negative studies
    assert "3/3 sent" in run.output and run.output.count("2/2 sent") == 3
    outbox = sorted((tmp_path / "demo" / "var" / "outbox").rglob("*.dcm"))
    # SR + SC for each of the four studies, a KOS for the positive head CT
    assert len(outbox) == len(files) == 9
    sent = {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}
    assert sent == {path.stem for path in outbox}


def test_demo_refuses_a_malformed_pacs_address(tmp_path: Path) -> None:
    run = CliRunner().invoke(app(), ["demo", "--data-dir", str(tmp_path), "--pacs", "no-port"])
    assert run.exit_code == 2
    assert "AET@host:port" in run.output
    assert not (tmp_path / "var").exists()  # refused before starting anything


def test_pacs_address() -> None:
    assert PacsAddress.parse("ORTHANC@pacs.example.org:4242") == PacsAddress(
        "ORTHANC", "pacs.example.org", 4242
    )
    for bad in ("@host:1", "A@host", "A@host:0", "A@host:70000", "WAY_TOO_LONG_AE_TITLE@h:1"):
        try:
            PacsAddress.parse(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")


def test_demo_routes_are_the_shipped_ones() -> None:
    with (ROOT / "config" / "node.toml").open("rb") as f:
        shipped = tomllib.load(f)["routes"]
    assert [{k: v for k, v in r.items() if k != "destinations"} for r in shipped] == DEMO_ROUTES


def test_demo_says_so_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = CliRunner().invoke(app(), ["demo", "--data-dir", str(tmp_path), "--port", str(port)])
    assert run.exit_code == 1
    assert "cannot start the node" in run.output
