"""A real Orthanc PACS for tests and benchmarks: its own storage, loopback ports, REST helpers.

``Orthanc(root, modalities={"ainode": ("AINODE", "127.0.0.1", port)})`` writes a JSON
configuration under ``root`` (storage and index there too), ``start()`` runs
``/usr/sbin/Orthanc`` and returns once ``/system`` answers, ``stop()`` ends it cleanly
(SIGTERM, then SIGKILL after a timeout). ``start()`` again reuses the same storage and ports,
which is how a PACS outage is played. REST calls use only the standard library.

``plugins=("dicomweb",)`` loads Debian's plugins (``/usr/share/orthanc/plugins``): DICOMweb
answers under ``/dicom-web/``. ``users={"name": "password"}`` turns on HTTP basic
authentication (the REST helpers log in as the first user). ``config={...}`` adds or overrides
configuration keys (a section given as a mapping is merged into the default one).
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.helpers import free_port

ORTHANC = "/usr/sbin/Orthanc"
PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
# Debian package -> plugin library (orthanc-dicomweb, orthanc-webviewer)
PLUGINS = {"dicomweb": "libOrthancDicomWeb.so", "webviewer": "libOrthancWebViewer.so"}


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call failed."""


class Orthanc:
    """One Orthanc process with its storage under ``root``.

    ``modalities`` maps Orthanc's name for a peer to ``(AE title, host, port)``; Orthanc sends
    to them with ``POST /modalities/{name}/store`` and accepts C-STORE from any AE title.
    """

    def __init__(
        self,
        root: Path,
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        *,
        aet: str = "ORTHANC",
        dicom_port: int | None = None,
        http_port: int | None = None,
        stable_age: int = 1,
        plugins: Sequence[str] = (),
        users: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        unknown = set(plugins) - set(PLUGINS)
        if unknown:
            raise OrthancError(f"unknown plugins {sorted(unknown)}; known: {sorted(PLUGINS)}")
        self.plugins = [PLUGIN_DIR / PLUGINS[name] for name in plugins]
        missing = [str(path) for path in self.plugins if not path.exists()]
        if missing:
            raise OrthancError(f"Orthanc plugins not installed: {missing}")
        self.users = dict(users or {})
        self.extra = dict(config or {})
        self.root = root
        self.aet = aet
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.modalities = dict(modalities or {})
        self.stable_age = stable_age
        self.log = root / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb service root (with the ``dicomweb`` plugin)."""
        return f"{self.url}/dicom-web"

    def configuration(self) -> dict[str, Any]:
        """The JSON configuration Orthanc is started with."""
        config: dict[str, Any] = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "Plugins": [str(path) for path in self.plugins],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()
            },
            "DicomScuTimeout": 30,
            "StableAge": self.stable_age,
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "OverwriteInstances": False,
        }
        for key, value in self.extra.items():
            merged = isinstance(value, Mapping) and isinstance(config.get(key), dict)
            config[key] = {**config[key], **value} if merged else value
        return config

    # --- process ---------------------------------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        """Start Orthanc (on the same storage and ports as before) and wait for ``/system``."""
        if self.proc is not None:
            raise OrthancError("Orthanc is already running")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "orthanc.json"
        config.write_text(json.dumps(self.configuration(), indent=2))
        binary = shutil.which("Orthanc") or ORTHANC
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=self.root
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise OrthancError(f"Orthanc exited at start:\n{self.log.read_text()[-3000:]}")
            try:
                self.get("/system", timeout=1)
                return
            except (OSError, OrthancError):
                time.sleep(0.1)
        self.stop()
        raise OrthancError(f"Orthanc did not answer within {timeout} s")

    def stop(self, timeout: float = 20) -> None:
        """Stop Orthanc cleanly (SIGTERM); kill it if it does not exit in ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- REST --------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        *,
        content_type: str = "application/octet-stream",
        timeout: float = 60,
    ) -> Any:
        """One REST call; returns the decoded JSON answer (or the raw bytes if not JSON)."""
        data = body.encode() if isinstance(body, str) else body
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", content_type)
        for user, password in list(self.users.items())[:1]:
            login = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {login}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw: bytes = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def get(self, path: str, timeout: float = 60) -> Any:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body: bytes | str | dict[str, Any], timeout: float = 120) -> Any:
        if isinstance(body, dict):
            return self.request(
                "POST", path, json.dumps(body), content_type="application/json", timeout=timeout
            )
        return self.request("POST", path, body, timeout=timeout)

    # --- conveniences ------------------------------------------------------------------------

    def upload(self, paths: list[Path]) -> str:
        """Upload Part 10 files (``POST /instances``); returns the Orthanc id of their study."""
        study = ""
        for path in paths:
            answer = self.post("/instances", path.read_bytes())
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise OrthancError(f"upload of {path}: {answer}")
            study = str(answer["ParentStudy"])
        if not study:
            raise OrthancError("nothing uploaded")
        return study

    def send_study(self, modality: str, study_id: str) -> Any:
        """C-STORE a study to a modality (``POST /modalities/{name}/store``), synchronously."""
        return self.post(f"/modalities/{modality}/store", study_id)

    def study_id(self, study_instance_uid: str) -> str | None:
        """The Orthanc id of a study, from its Study Instance UID (None if not stored)."""
        found = self.post(
            "/tools/lookup",
            study_instance_uid,
        )
        for item in found:
            if item.get("Type") == "Study":
                return str(item["ID"])
        return None

    def series_of(self, study_id: str) -> list[dict[str, Any]]:
        """The study's series with their main tags and instance ids."""
        series: list[dict[str, Any]] = self.get(f"/studies/{study_id}/series")
        return series

    def tags(self, instance_id: str) -> dict[str, Any]:
        """An instance's tags, simplified (keyword -> value, sequences as lists)."""
        tags: dict[str, Any] = self.get(f"/instances/{instance_id}/tags?simplify")
        return tags

    def instances_by_series_uid(self, study_id: str) -> dict[str, list[str]]:
        """Series Instance UID -> the SOP Instance UIDs Orthanc holds in it."""
        out: dict[str, list[str]] = {}
        for series in self.series_of(study_id):
            uid = series["MainDicomTags"]["SeriesInstanceUID"]
            instances = self.get(f"/series/{series['ID']}/instances")
            out[uid] = [i["MainDicomTags"]["SOPInstanceUID"] for i in instances]
        return out


def strings(value: Any) -> Iterator[str]:
    """Every string anywhere in a JSON value (Orthanc's simplified tags nest sequences)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


@contextmanager
def running_orthanc(
    root: Path, modalities: Mapping[str, tuple[str, str, int]] | None = None, **kwargs: Any
) -> Iterator[Orthanc]:
    """An Orthanc started for the ``with`` block and stopped after it, whatever happens."""
    orthanc = Orthanc(root, modalities, **kwargs)
    try:
        orthanc.start()
        yield orthanc
    finally:
        orthanc.stop()
