"""The command line as operators use it: config errors, send, jobs list/show/retry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_ai_node.jobs.models import Instance, Job
from dicom_ai_node.node import Node
from tests.support.helpers import instance, wait_for, write


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_ai_node", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=timeout,
    )


def test_wrong_config_stops_with_one_message_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[dicom]\nport = "eleven"\n[[routes]]\nname = "r"\nmodel = "m"\n'
        'destinations = ["nowhere"]\n'
    )
    result = cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert "dicom.port" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_unknown_destination_in_a_route_is_named(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[[routes]]\nname = "r"\nmodel = "m"\ndestinations = ["nowhere"]\n')
    result = cli("jobs", "list", env={"DICOM_AI_NODE_CONFIG": str(config)})
    assert result.returncode == 2
    assert "routes[0].destinations" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"level": "study", "fetch_missing": "nowhere"}, "unknown source 'nowhere'"),
        ({"fetch_missing": "pacs"}, 'only for level = "study"'),
    ],
)
def test_fetch_missing_names_a_source_of_a_study_route(keys: dict[str, str], named: str) -> None:
    from pydantic import ValidationError

    from dicom_ai_node.config import Settings

    source = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}
    with pytest.raises(ValidationError, match=r"routes\[0\]\.fetch_missing") as raised:
        Settings.model_validate(
            {"sources": [source], "routes": [{"name": "r", "model": "m", **keys}]}
        )
    assert named in str(raised.value)


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    from dicom_ai_node.config import load_settings

    config = tmp_path / "node.toml"
    config.write_text('[dicom]\nport = 104\nae_title = "FROMFILE"\n')
    os.environ["DICOM_AI_NODE_DICOM__PORT"] = "11113"
    try:
        settings = load_settings(config)
    finally:
        del os.environ["DICOM_AI_NODE_DICOM__PORT"]
    assert (settings.dicom.port, settings.dicom.ae_title) == (11113, "FROMFILE")


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    result = cli("jobs", "list", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


@pytest.mark.slow
def test_send_folder_to_a_node_and_list_its_jobs(
    node_factory: Callable[..., Node], tmp_path: Path
) -> None:
    node = node_factory(routes=[])
    study, series = generate_uid(), generate_uid()
    folder = tmp_path / "study"
    for n in range(3):
        write(instance(study=study, series=series, InstanceNumber=n + 1), folder / "sub")
    (folder / "notes.txt").write_text("not DICOM")
    result = cli("send", str(folder), "--port", str(node.scp.port), "--aet", "AINODE")
    # The text file is reported as a failure; the three instances arrive.
    assert result.returncode == 1
    assert "notes.txt" in result.stderr
    assert "sent 3 of 4 files" in result.stdout
    with node.sessions() as session:
        assert len(session.scalars(select(Instance)).all()) == 3

    def job() -> Job | None:
        with node.read_sessions() as session:
            return session.scalars(select(Job)).first()

    wait_for(job)

    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "{node.settings.storage.data_dir}"\n')
    listed = cli("jobs", "list", "--json", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    jobs = json.loads(listed.stdout)
    assert len(jobs) == 1
    for key in (
        "id",
        "study_instance_uid",
        "series_instance_uid",
        "modality",
        "route",
        "model",
        "state",
        "priority",
        "created_at",
        "updated_at",
        "label",
        "probability",
    ):
        assert key in jobs[0]
    assert jobs[0]["state"] == "skipped"
    assert jobs[0]["series_instance_uid"] == series

    shown = cli("jobs", "show", str(jobs[0]["id"]), "--json", "--config", str(config))
    assert shown.returncode == 0
    assert [e["kind"] for e in json.loads(shown.stdout)["events"]] == ["series_skipped"]
    refused = cli("jobs", "retry", str(jobs[0]["id"]), "--config", str(config))
    assert refused.returncode == 1
    assert "skipped" in refused.stderr


@pytest.mark.slow
def test_model_card_that_does_not_match_its_weights_stops_startup(tmp_path: Path) -> None:
    import shutil

    from dicom_ai_node.infer.runtime import BUNDLED_MODELS_DIR

    package = tmp_path / "models" / "broken-demo"
    shutil.copytree(BUNDLED_MODELS_DIR / "cxr-opacity-demo", package)
    card = (package / "model.toml").read_text()
    card = card.replace('name = "cxr-opacity-demo"', 'name = "broken-demo"')
    card = card.replace("height = 128", "height = 96")  # the weights take 128x128
    (package / "model.toml").write_text(card)
    config = tmp_path / "node.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "var"}"\n[models]\ndirs = ["{tmp_path / "models"}"]\n'
        "[dicom]\nport = 0\n[http]\nport = 0\n"
        '[[routes]]\nname = "r"\nmodel = "broken-demo"\nwhere = { Modality = ["CR"] }\n'
    )
    result = cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert "broken-demo" in result.stderr and "input" in result.stderr.lower()
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_port_in_use_stops_serve_with_one_message(tmp_path: Path) -> None:
    import socket

    empty = tmp_path / "empty.toml"
    empty.write_text("")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cli(
            "serve",
            env={
                "DICOM_AI_NODE_CONFIG": str(empty),
                "DICOM_AI_NODE_DICOM__BIND": "127.0.0.1",
                "DICOM_AI_NODE_DICOM__PORT": str(taken.getsockname()[1]),
                "DICOM_AI_NODE_HTTP__PORT": "0",
                "DICOM_AI_NODE_STORAGE__DATA_DIR": str(tmp_path / "var"),
            },
            timeout=60,
        )
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "Traceback" not in result.stderr
