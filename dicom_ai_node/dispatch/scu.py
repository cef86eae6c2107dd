"""C-STORE SCU: sends DICOM files to a peer (PS3.4 Annex B, PS3.7 Section 9.1.1).

Each file goes in its own transfer syntax when the peer accepts it, so nothing is decoded
or re-encoded; a compressed file whose syntax the peer refuses is decompressed and sent
uncompressed. For that, every SOP Class is proposed once per compressed syntax present and
once with the uncompressed syntaxes (PS3.8 Section 9.3.2.2, at most 128 presentation
contexts per association: more are split over several associations).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

log = logging.getLogger(__name__)

_UNCOMPRESSED: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
_MAX_CONTEXTS = 128
_NO_RESPONSE = "no response (association lost)"


@dataclass(frozen=True)
class Peer:
    """Where to send: the peer's AE title, host and port, and our own AE title.

    With ``tls`` the association runs over TLS (PS3.15 Annex B.1) and the peer's
    certificate must name ``server_name`` (the host when empty).
    """

    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "AINODE"
    tls: ssl.SSLContext | None = None
    server_name: str = ""


@dataclass(frozen=True)
class SendOutcome:
    """What happened to one file: a DIMSE status, or ``status=None`` with the error."""

    path: Path
    sop_instance_uid: str
    status: int | None
    error: str = ""

    @property
    def ok(self) -> bool:
        """Success (0x0000) or a warning (0x0001, 0xBxxx): the peer stored it (PS3.4 B.2.3)."""
        return self.status is not None and (
            self.status in (0x0000, 0x0001) or (self.status & 0xF000) == 0xB000
        )


@dataclass(frozen=True)
class _File:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def _describe(paths: Iterable[Path]) -> tuple[list[_File], list[SendOutcome]]:
    files, unreadable = [], []
    for path in paths:
        try:
            meta = read_file_meta_info(path)
            files.append(
                _File(
                    path,
                    str(meta.MediaStorageSOPClassUID),
                    str(meta.MediaStorageSOPInstanceUID),
                    str(meta.TransferSyntaxUID),
                )
            )
        except Exception as exc:
            unreadable.append(SendOutcome(path, "", None, f"not a DICOM file: {exc}"))
    return files, unreadable


def _context_keys(f: _File) -> list[tuple[str, str | None]]:
    """The presentation contexts a file needs: its own compressed syntax (if any) and the
    uncompressed ones (``None``), for its SOP Class."""
    keys: list[tuple[str, str | None]] = [(f.sop_class_uid, None)]
    if f.transfer_syntax_uid not in _UNCOMPRESSED:
        keys.insert(0, (f.sop_class_uid, f.transfer_syntax_uid))
    return keys


def _contexts(files: Sequence[_File]) -> list[PresentationContext]:
    wanted = dict.fromkeys(key for f in files for key in _context_keys(f))
    return [
        build_context(sop_class, [ts] if ts else list(_UNCOMPRESSED)) for sop_class, ts in wanted
    ]


def _batches(files: Sequence[_File]) -> list[list[_File]]:
    """Split files so that each batch needs at most 128 presentation contexts."""
    batches: list[list[_File]] = [[]]
    keys: set[tuple[str, str | None]] = set()
    for f in files:
        needed = keys.union(_context_keys(f))
        if len(needed) > _MAX_CONTEXTS:
            batches.append([])
            needed = set(_context_keys(f))
        keys = needed
        batches[-1].append(f)
    return [b for b in batches if b]


def _accepted(assoc: Association, sop_class: str) -> set[str]:
    return {
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class and cx.transfer_syntax
    }


def _send_one(assoc: Association, f: _File) -> SendOutcome:
    accepted = _accepted(assoc, f.sop_class_uid)
    if f.transfer_syntax_uid in accepted:
        dataset: object = f.path
    elif accepted & {str(ts) for ts in _UNCOMPRESSED}:
        ds = dcmread(f.path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        dataset = ds
    else:
        return SendOutcome(f.path, f.sop_instance_uid, None, "the peer accepted no context for it")
    status = assoc.send_c_store(dataset)  # type: ignore[arg-type]
    if not status or "Status" not in status:
        return SendOutcome(f.path, f.sop_instance_uid, None, _NO_RESPONSE)
    code = int(status.Status)
    comment = str(status.get("ErrorComment", ""))
    return SendOutcome(f.path, f.sop_instance_uid, code, comment)


def associate(
    peer: Peer,
    contexts: list[PresentationContext],
    timeout: float,
    handlers: list[tuple[Any, Callable[..., Any]]] | None = None,
) -> Association:
    """An association to ``peer`` proposing ``contexts`` (over TLS when the peer says so);
    ``handlers`` are bound to it (pynetdicom events). Check ``is_established``."""
    ae = AE(ae_title=peer.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.requested_contexts = contexts
    tls_args = (peer.tls, peer.server_name or peer.host) if peer.tls else None
    return ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        tls_args=tls_args,
        evt_handlers=handlers or [],  # type: ignore[arg-type]
    )


def send_files(
    paths: Iterable[Path],
    peer: Peer,
    *,
    timeout: float = 30.0,
    on_sent: Callable[[SendOutcome], None] | None = None,
) -> list[SendOutcome]:
    """Send files to ``peer``; one outcome per file, in order. Never raises for peer faults."""
    files, outcomes = _describe(paths)
    for outcome in outcomes:
        if on_sent:
            on_sent(outcome)
    for batch in _batches(files):
        assoc = associate(peer, _contexts(batch), timeout)
        if not assoc.is_established:
            error = "association rejected" if assoc.is_rejected else "association failed or aborted"
            for f in batch:
                outcome = SendOutcome(f.path, f.sop_instance_uid, None, error)
                outcomes.append(outcome)
                if on_sent:
                    on_sent(outcome)
            continue
        lost = False
        try:
            for f in batch:
                # A request left unanswered means the association is gone, even if the
                # reactor has not noticed yet: sending more would only wait out the timeout.
                if assoc.is_established and not lost:
                    try:
                        outcome = _send_one(assoc, f)
                    except Exception as exc:  # an unreadable file must not stop the rest
                        outcome = SendOutcome(f.path, f.sop_instance_uid, None, str(exc))
                    lost = outcome.error == _NO_RESPONSE
                else:
                    outcome = SendOutcome(f.path, f.sop_instance_uid, None, "association lost")
                outcomes.append(outcome)
                if on_sent:
                    on_sent(outcome)
        finally:
            if assoc.is_established:
                assoc.release()
    return outcomes
