"""DICOMweb in: the Store Transaction (STOW-RS, PS3.18 Section 10.5) at ``/dicomweb/studies``.

The body is ``multipart/related; type="application/dicom"`` (PS3.18 8.6.1.2, RFC 2387), one
PS3.10 instance per part. It is streamed to an unlinked temporary file next to the spool (at
most ``[http] stow_max_mb``), then each part goes through the same
:class:`~dicom_ai_node.receive.ingest.Ingest` as a C-STORE: fsynced into the spool and recorded
in the job log before the response is sent. The response (PS3.18 10.5.3, Table 10.5.3-3) lists
the stored instances in the Referenced SOP Sequence and the refused ones in the Failed SOP
Sequence, each with its Failure Reason (the C-STORE status, PS3.4 B.2.3); its HTTP status is
200 when all were stored, 202 when some were, 409 when none was.

A body that is not such a multipart answers 400 (415 for another media type, or for a part
that is not ``application/dicom``: metadata + bulk data parts are not supported), one that is
too large 413, and an Accept that admits no ``application/dicom+json`` 406, before anything
is stored.
"""

from __future__ import annotations

import json
import logging
import mmap
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from pydicom.dataset import Dataset
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from dicom_ai_node.audit.messages import Peer, ReceivedTally
from dicom_ai_node.audit.trail import AuditTrail
from dicom_ai_node.jobs.models import utcnow
from dicom_ai_node.jobs.store import add_event
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.receive.ingest import Ingest, Stored

log = logging.getLogger(__name__)

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
SENDER = "STOW-RS"  # how the job log and metrics name the sender (in place of an AE title)


class MalformedBodyError(ValueError):
    """A request body that is not a multipart/related body of DICOM parts (HTTP 400)."""


@dataclass(frozen=True)
class Part:
    """One body part: its media type and where its content lies in the body."""

    content_type: str
    start: int
    end: int


def parse_content_type(value: str) -> tuple[str, str, str]:
    """(media type, boundary, ``type`` parameter) of a Content-Type header (RFC 2045 5.1)."""
    header = EmailMessage()
    header["Content-Type"] = value
    boundary = header.get_param("boundary")
    kind = header.get_param("type")
    return (
        header.get_content_type(),
        boundary if isinstance(boundary, str) else "",
        kind.lower() if isinstance(kind, str) else "",
    )


def acceptable(accept: str) -> bool:
    """Whether an Accept header (RFC 9110 12.5.1) admits the DICOM JSON response
    (PS3.18 10.5.2: the origin server answers 406 when it cannot)."""
    if not accept.strip():
        return True
    offered = {DICOM_JSON, "application/json", "application/*", "*/*"}
    return any(item.split(";")[0].strip().lower() in offered for item in accept.split(","))


def split_parts(body: bytes | mmap.mmap, boundary: bytes, default_type: str) -> Iterator[Part]:
    """The parts of a multipart body (RFC 2046 5.1.1): the preamble before the first
    delimiter and the epilogue after the close delimiter are ignored; a part without a
    Content-Type has the root's ``type``. Raises :class:`MalformedBodyError`."""
    dash = b"--" + boundary
    delimiter = b"\r\n" + dash
    if body[: len(dash)] == dash:
        pos = 0
    else:
        pos = body.find(delimiter)
        if pos < 0:
            raise MalformedBodyError("no multipart boundary in the body")
        pos += 2
    number = 0
    while True:
        pos += len(dash)
        if body[pos : pos + 2] == b"--":
            return
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise MalformedBodyError("a boundary line is not followed by a line break")
        number += 1
        pos = line_end + 2
        if body[pos : pos + 2] == b"\r\n":
            raw_headers, start = b"", pos + 2
        else:
            header_end = body.find(b"\r\n\r\n", pos)
            if header_end < 0:
                raise MalformedBodyError(f"part {number}: its headers do not end")
            raw_headers, start = bytes(body[pos:header_end]), header_end + 4
        end = body.find(delimiter, start)
        if end < 0:
            raise MalformedBodyError(f"part {number} is not closed by a boundary")
        headers = BytesHeaderParser().parsebytes(raw_headers + b"\r\n\r\n")
        declared = headers.get("Content-Type")
        content_type = default_type
        if declared is not None:
            content_type = parse_content_type(str(declared))[0]
        yield Part(content_type, start, end)
        pos = end + 2


def response_body(outcomes: list[Stored]) -> Dataset:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-3)."""
    body = Dataset()
    referenced, failed = [], []
    for stored in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = stored.header.sop_class_uid if stored.header else ""
        item.ReferencedSOPInstanceUID = stored.header.sop_instance_uid if stored.header else ""
        if stored.ok:
            referenced.append(item)
        else:
            item.FailureReason = stored.status
            failed.append(item)
    if referenced:
        body.ReferencedSOPSequence = referenced
    if failed:
        body.FailedSOPSequence = failed
    return body


def http_status(outcomes: list[Stored]) -> int:
    """200 all stored, 202 some, 409 none (PS3.18 10.5.3.1)."""
    stored = sum(1 for s in outcomes if s.ok)
    return 200 if stored == len(outcomes) else 202 if stored else 409


def stow_router(
    ingest: Ingest,
    engine: Engine,
    metrics: NodeMetrics,
    max_bytes: int,
    audit: AuditTrail | None = None,
    node_name: str = "",
) -> APIRouter:
    """``POST /dicomweb/studies`` (the caller adds the token check); with ``audit``, what a
    request stored is audited per study as DICOM Instances Transferred (PS3.15 A.5.3.4)."""
    router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

    def store_all(body: mmap.mmap, parts: list[Part], client: str) -> list[Stored]:
        outcomes = []
        received = ReceivedTally()
        for part in parts:
            stored = ingest.store(
                body[part.start : part.end], association_id=None, calling_ae_title=SENDER
            )
            metrics.instance_received(SENDER, stored.status, stored.size)
            outcomes.append(stored)
            if stored.ok and stored.header is not None:
                header = stored.header
                received.add(header.study_instance_uid, header.patient_id, header.sop_class_uid)
        if audit is not None:
            for event in received.events(Peer(SENDER, client), Peer(node_name, ""), utcnow()):
                audit.record(event)
        ok = sum(1 for s in outcomes if s.ok)
        with engine.begin() as connection:
            add_event(
                connection,
                "stow_received",
                f"STOW-RS from {client}: {ok} of {len(outcomes)} instances stored",
            )
        return outcomes

    @router.post(
        "/studies",
        response_class=Response,
        responses={
            200: {"content": {DICOM_JSON: {}}, "description": "All instances stored"},
            202: {"content": {DICOM_JSON: {}}, "description": "Some instances stored"},
            400: {"description": "Not a multipart/related body"},
            409: {"content": {DICOM_JSON: {}}, "description": "No instance stored"},
            413: {"description": "Body larger than [http] stow_max_mb"},
            406: {"description": "Accept admits no DICOM JSON response"},
            415: {"description": "Not application/dicom parts"},
        },
    )
    async def store_instances(request: Request) -> Response:
        """Store instances (STOW-RS, PS3.18 10.5): a ``multipart/related;
        type="application/dicom"`` body of PS3.10 instances."""
        if not acceptable(request.headers.get("accept", "")):
            raise HTTPException(406, f"the response is {DICOM_JSON} (XML is not offered)")
        media, boundary, kind = parse_content_type(request.headers.get("content-type", ""))
        if media != "multipart/related":
            raise HTTPException(415, f'expected multipart/related; type="{DICOM}", not {media}')
        if not boundary:
            raise HTTPException(400, "the Content-Type has no boundary parameter")
        if kind and kind != DICOM:
            raise HTTPException(415, f'only type="{DICOM}" is supported, not {kind}')
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise HTTPException(413, f"body larger than {max_bytes / 2**20:g} MB")
        client = f"{request.client.host}" if request.client else "unknown"
        with tempfile.TemporaryFile(dir=ingest.spool.root) as spooled:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise HTTPException(413, f"body larger than {max_bytes / 2**20:g} MB")
                spooled.write(chunk)
            if not size:
                raise HTTPException(400, "the body is empty")
            spooled.flush()
            with mmap.mmap(spooled.fileno(), 0, access=mmap.ACCESS_READ) as body:
                try:
                    parts = list(split_parts(body, boundary.encode("latin-1"), kind or DICOM))
                except MalformedBodyError as exc:
                    raise HTTPException(400, f"malformed multipart body: {exc}") from None
                if not parts:
                    raise HTTPException(400, "the body has no parts")
                for number, part in enumerate(parts, 1):
                    if part.content_type != DICOM:
                        raise HTTPException(
                            415, f"part {number} is {part.content_type}, not {DICOM}"
                        )
                outcomes = await run_in_threadpool(store_all, body, parts, client)
        log.info(
            "STOW-RS from %s: %d of %d instances stored",
            client,
            sum(1 for s in outcomes if s.ok),
            len(outcomes),
        )
        answer: dict[str, Any] = response_body(outcomes).to_json_dict()
        return Response(json.dumps(answer), http_status(outcomes), media_type=DICOM_JSON)

    return router
