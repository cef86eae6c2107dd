"""OHIF v3 served on loopback, with Orthanc's DICOMweb behind it on the same origin.

``make ohif`` unpacks npm's ``@ohif/app`` (a built app in ``dist/``) under ``.viewers/``.
:func:`serving_ohif` serves it from a thread: the files of ``dist/``, ``index.html`` for the
app's page routes (``/viewer``, ``/``...), our own ``app-config.js`` (one DICOMweb data
source at ``/dicom-web``) and ``/dicom-web/...`` proxied to Orthanc, so the browser never
leaves the origin (no CORS) and never leaves 127.0.0.1.
"""

from __future__ import annotations

import mimetypes
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.helpers import ROOT

OHIF_VERSION = "3.13.2"  # as the Makefile's OHIF_VERSION
OHIF_DIST = ROOT / ".viewers" / f"ohif-{OHIF_VERSION}" / "dist"

_APP_CONFIG = """window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  showStudyList: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (test)',
        name: 'orthanc',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
"""
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


def ohif_dist() -> Path:
    """The unpacked app; fails (not skips) when ``make ohif`` has not run."""
    if not (OHIF_DIST / "index.html").is_file():
        pytest.fail(f"OHIF {OHIF_VERSION} is not installed at {OHIF_DIST}: run `make ohif`")
    return OHIF_DIST.resolve()  # files are resolved, and must stay inside it, links followed


def _handler(dist: Path, dicomweb: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path.startswith("/dicom-web/"):
                self._proxy()
            elif path == "/app-config.js":
                self._send(200, _APP_CONFIG.encode(), "application/javascript")
            else:
                file = (dist / path.lstrip("/")).resolve()
                if not file.is_relative_to(dist) or not file.is_file():
                    file = dist / "index.html"  # a page route of the app
                kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                if file.suffix == ".wasm":
                    kind = "application/wasm"
                self._send(200, file.read_bytes(), kind)

        def _proxy(self) -> None:
            # Orthanc's DICOMweb plugin 1.7 ignores an includefield list whose commas are
            # URL-encoded (%2C), as OHIF sends it, and then leaves out Study Description:
            # the commas are passed as they are (PS3.18 8.3.4.3, a comma-separated list).
            target = dicomweb + self.path[len("/dicom-web") :].replace("%2C", ",")
            request = urllib.request.Request(target, headers={"Accept": self.headers["Accept"]})
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    body, status, headers = answer.read(), answer.status, answer.headers
            except urllib.error.HTTPError as exc:
                body, status, headers = exc.read(), exc.code, exc.headers
            self.send_response(status)
            for name, value in headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@contextmanager
def serving_ohif(dicomweb: str) -> Iterator[str]:
    """OHIF on a free loopback port, proxying ``/dicom-web`` to ``dicomweb`` (Orthanc's
    DICOMweb root); yields the app's URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(ohif_dist(), dicomweb))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="ohif", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
