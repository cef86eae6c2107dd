"""Helpers shared by the tests: free ports, settings in a temporary folder, test data sets
and the real DCMTK tools."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.config import Settings
from dicom_ai_node.jobs.queue import claim

# the checkout: where `serve` runs and config/node.toml lives
ROOT = Path(__file__).resolve().parents[2]

# DCMTK tools stall ~40 ms per message on loopback without it (delayed ACKs).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


# Ports for the servers the tests start are taken below the kernel's ephemeral range (32768 and
# up on Linux), so that no outgoing connection can be given one as its local port between the
# moment a test picks it and the moment its server binds it; each is handed out once per run.
_PORT_BASE, _PORT_SPAN = 20000, 12000
_ports = itertools.count((os.getpid() * 37) % _PORT_SPAN)


def free_port() -> int:
    """A TCP port free on loopback now, outside the ephemeral range, not handed out before."""
    for n in _ports:
        port = _PORT_BASE + n % _PORT_SPAN
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("unreachable: the port counter is endless")


def require(tool: str) -> str:
    """The path of a peer tool; fails (not skips) when missing: `make test` installs it."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed; run `make test`, which installs it")
    return path


def run_tool(
    *args: str, timeout: float = 60, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK (or other) command line tool with TCP_NODELAY set."""
    require(args[0])
    result = subprocess.run(
        list(args), capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}): {result.stderr}")
    return result


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a test node: loopback, free port, data under ``tmp_path``, quick timers."""
    base: dict[str, Any] = {
        "node_name": "test-node",
        "dicom": {"bind": "127.0.0.1", "port": 0},
        "http": {"bind": "127.0.0.1", "port": 0},
        "storage": {"data_dir": tmp_path / "var", "min_free_mb": 0},
        "assemble": {"stable_seconds": 0.3, "poll_seconds": 0.1},
        "worker": {"poll_seconds": 0.1, "lease_seconds": 10},
        "dispatch": {"poll_seconds": 0.2, "retry_base_seconds": 0.2, "retry_max_seconds": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return Settings(**base)


def wait_for(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; return its value or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def instance(
    source: str = "CT_small.dcm",
    *,
    study: str | None = None,
    series: str | None = None,
    sop: str | None = None,
    **attributes: Any,
) -> Dataset:
    """A copy of one of pydicom's test files with new (or given) UIDs."""
    path = get_testdata_file(source)
    assert path is not None, source
    ds = dcmread(path)
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def write(ds: Dataset, folder: Path) -> Path:
    """Save a data set as a Part 10 file named after its SOP Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@contextmanager
def storescp(
    port: int, out: Path, aet: str = "PACS", options: Sequence[str] = ()
) -> Iterator[Path]:
    """DCMTK ``storescp`` on ``port`` writing what it receives to ``out`` (a PACS stand-in);
    ``options`` are more storescp options (TLS ones, say)."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [require("storescp"), "-aet", aet, "-od", str(out), *options, str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def listening() -> bool:
            assert proc.poll() is None, "storescp exited"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, timeout=10)
        yield out
    finally:
        proc.terminate()
        proc.wait(10)


def received_uids(folder: Path) -> list[str]:
    """SOP Instance UIDs of the files ``storescp`` wrote."""
    return sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in folder.iterdir())


def rows_with_colour(
    pixels: npt.NDArray[np.uint8], colour: tuple[int, int, int], tolerance: int = 40
) -> npt.NDArray[np.intp]:
    """Indices of the rows of an RGB image that have pixels of ``colour`` (e.g. where the
    Secondary Capture's burned-in result line is)."""
    close = np.abs(pixels.astype(int) - colour).max(axis=-1) < tolerance
    return np.flatnonzero(close.any(axis=1))


def claim_from_threads(sessions: sessionmaker[Session], workers: int) -> list[int]:
    """Job ids claimed by ``workers`` threads racing to empty the queue (with repeats, if
    the claim were broken)."""
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        while True:
            with sessions.begin() as session:
                job = claim(session, f"w:{n}", 60, 3)
            if job is None:
                return
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return claimed


def acknowledged_by_storescu(storescu_log: str) -> set[str]:
    """SOP Instance UIDs that storescu (-v) saw acknowledged: a "Sending file" line followed
    by a successful (or warning) Store Response."""
    acknowledged, current = set(), None
    for line in storescu_log.splitlines():
        if line.startswith("I: Sending file: "):
            current = line.removeprefix("I: Sending file: ").strip()
        elif line.startswith("I: Received Store Response (") and current is not None:
            if "Success" in line or "Warning" in line:
                acknowledged.add(str(dcmread(current, stop_before_pixels=True).SOPInstanceUID))
            current = None
    return acknowledged


def http_json(url: str) -> tuple[int, dict[str, object]]:
    """The status and JSON body of a GET, an error status (``/healthz``'s 503) included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def metric_sample(metrics_url: str, prefix: str) -> str:
    """The value of the first sample of a Prometheus exposition whose line starts with
    ``prefix`` (a name and the opening of its labels)."""
    lines = urllib.request.urlopen(metrics_url, timeout=10).read().decode().splitlines()
    return next(str(line.split()[-1]) for line in lines if line.startswith(prefix))
