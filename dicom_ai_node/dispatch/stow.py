"""STOW-RS client: sends DICOM files to a DICOMweb origin server (PS3.18 Section 10.5).

All files of a call go in one ``POST {base}/studies`` request as a multipart/related body
of ``application/dicom`` parts (PS3.18 8.6.1.2), each file as stored (no re-encoding). The
response (PS3.18 10.5.3, Table 10.5.3-1) is read per instance: those in the Referenced SOP
Sequence (0008,1199) are stored, those in the Failed SOP Sequence (0008,1198) failed with
the Failure Reason (0008,1197) given. An instance the response does not mention, an HTTP
error or a connection failure leaves the file undelivered (``status=None``), to be retried.
"""

from __future__ import annotations

import logging
import secrets
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydicom.filereader import read_file_meta_info

from dicom_ai_node.dispatch.scu import SendOutcome

log = logging.getLogger(__name__)

# PS3.18 Table 10.5.3-1 attributes of the Store Instances Response Module (JSON keys).
_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"
# The status recorded for a stored instance (PS3.4 B.2.3 "Success"), and for a failed one
# that names no Failure Reason ("Processing failure", PS3.7 C.4.2).
_STORED, _PROCESSING_FAILURE = 0x0000, 0x0110


@dataclass(frozen=True)
class WebPeer:
    """A DICOMweb origin server: its base URL (the service root, e.g.
    ``https://pacs:8443/dicom-web``), HTTP basic credentials or a bearer token, and the TLS
    context checking its certificate (``None`` for the system's trust store)."""

    url: str
    username: str = ""
    password: str = ""
    token: str = ""
    tls: ssl.SSLContext | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def auth(self) -> httpx.BasicAuth | None:
        return httpx.BasicAuth(self.username, self.password) if self.username else None


def stow_files(paths: Iterable[Path], peer: WebPeer, *, timeout: float = 30.0) -> list[SendOutcome]:
    """Store files on ``peer`` in one STOW-RS request; one outcome per file, in order.

    Never raises for peer faults: a refused or failed request gives every file
    ``status=None`` with the reason.
    """
    files: list[tuple[Path, str]] = []
    outcomes: list[SendOutcome] = []
    for path in paths:
        try:
            files.append((path, str(read_file_meta_info(path).MediaStorageSOPInstanceUID)))
        except Exception as exc:  # an unreadable file must not stop the rest
            outcomes.append(SendOutcome(path, "", None, f"cannot read {path.name}: {exc}"))
    if not files:
        return outcomes
    boundary = secrets.token_hex(16)
    headers = {
        **peer.headers(),
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    try:
        with httpx.Client(
            verify=peer.tls if peer.tls is not None else True, timeout=timeout, auth=peer.auth()
        ) as client:
            response = client.post(
                peer.url.rstrip("/") + "/studies",
                content=b"".join(_multipart([path for path, _ in files], boundary)),
                headers=headers,
            )
    except httpx.HTTPError as exc:
        error = f"STOW-RS request failed: {type(exc).__name__}: {exc}"
        return outcomes + [SendOutcome(path, uid, None, error) for path, uid in files]
    # 200: all stored; 202: some failed or warnings; 409: none stored (PS3.18 10.5.3.1).
    if response.status_code not in (200, 202, 409):
        error = f"STOW-RS HTTP {response.status_code}: {response.text[:200]}"
        return outcomes + [SendOutcome(path, uid, None, error) for path, uid in files]
    stored, failed = _instances(response)
    for path, uid in files:
        if uid in failed:
            reason = failed[uid]
            outcomes.append(
                SendOutcome(
                    path,
                    uid,
                    reason,
                    f"STOW-RS failed (HTTP {response.status_code}, reason 0x{reason:04X})",
                )
            )
        elif uid in stored:
            outcomes.append(SendOutcome(path, uid, stored[uid]))
        else:
            error = f"STOW-RS HTTP {response.status_code}: instance not in the response"
            outcomes.append(SendOutcome(path, uid, None, error))
    return outcomes


def _multipart(paths: list[Path], boundary: str) -> Iterator[bytes]:
    """The request body's pieces (PS3.18 8.6.1.2, RFC 2387). They are joined rather than
    streamed: a body with a Content-Length, which every server accepts (chunked uploads
    are not universal), and a call's results are a few megabytes."""
    for path in paths:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield path.read_bytes()
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _instances(response: httpx.Response) -> tuple[dict[str, int], dict[str, int]]:
    """(stored, failed): SOP Instance UID -> status, from the response's JSON."""
    try:
        body = response.json()
    except ValueError:
        return {}, {}
    if isinstance(body, list):  # some servers wrap the one dataset in an array
        body = body[0] if body else {}
    if not isinstance(body, dict):
        return {}, {}
    stored = {
        uid: _reason(item, _WARNING_REASON, _STORED)
        for uid, item in _items(body, _REFERENCED_SOP_SEQUENCE)
    }
    failed = {
        uid: _reason(item, _FAILURE_REASON, _PROCESSING_FAILURE)
        for uid, item in _items(body, _FAILED_SOP_SEQUENCE)
    }
    return stored, failed


def _items(body: dict[str, Any], tag: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for item in (body.get(tag) or {}).get("Value") or []:
        values = (item.get(_REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or []
        if values:
            yield str(values[0]), item


def _reason(item: dict[str, Any], tag: str, default: int) -> int:
    """A Failure or Warning Reason (VR US) as a status; warnings are 0xB000 at least."""
    values = (item.get(tag) or {}).get("Value") or []
    if not values:
        return default
    reason = int(values[0])
    return reason if tag == _FAILURE_REASON or reason & 0xF000 == 0xB000 else 0xB000
