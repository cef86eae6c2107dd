"""Taking in one instance, whatever carried it: C-STORE (PS3.4 Annex B) or STOW-RS (PS3.18
10.5).

:meth:`Ingest.store` checks the Part 10 stream, writes it to the spool (fsynced) and commits
its row (in a transaction it may share with concurrent associations, see
:class:`~dicom_ai_node.receive.record.GroupCommit`), and only then says success. A refusal
carries a status from PS3.4 B.2.3, which STOW-RS reuses as its Failure Reason (PS3.18 Table
10.5.3-4): 0xA700 (out of resources) when the disk or the job log fails, the instance is too
large or free space is below the floor, 0xA900 when the data set does not match the SOP Class
it was sent as, 0xC000 (cannot understand) when it cannot be parsed or lacks valid UIDs.
Refusals are logged and added to the job log as ``instance_refused`` events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine

from dicom_ai_node.jobs.store import add_event
from dicom_ai_node.receive.header import InstanceHeader, UnreadableInstanceError, read_header
from dicom_ai_node.receive.record import GroupCommit
from dicom_ai_node.spool import InvalidUIDError, Spool

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class Stored:
    """The outcome of storing one instance: ``status`` 0x0000 or the refusal's code and
    ``reason``; ``header`` when the stream could be parsed; ``size`` the bytes stored."""

    status: int
    reason: str = ""
    header: InstanceHeader | None = None
    size: int = 0

    @property
    def ok(self) -> bool:
        return self.status == STATUS_SUCCESS


class Ingest:
    """Stores instances into one spool and job log.

    ``max_instance_bytes`` bounds one instance; ``min_free_bytes`` makes it refuse instances
    (0xA700) while the spool's disk has less free space than that; ``extra_keywords`` are
    header attributes that routes use beyond the usual ones; ``on_floor(below)`` is called
    when free space crosses the floor either way.
    """

    def __init__(
        self,
        spool: Spool,
        engine: Engine,
        *,
        max_instance_bytes: int,
        min_free_bytes: int = 0,
        extra_keywords: tuple[str, ...] = (),
        on_floor: Callable[[bool], None] | None = None,
    ) -> None:
        self.spool = spool
        self.engine = engine
        self.recorder = GroupCommit(engine)
        self.max_instance_bytes = max_instance_bytes
        self.min_free_bytes = min_free_bytes
        self.extra_keywords = extra_keywords
        self.on_floor = on_floor
        self._space_ok = True
        self._space_checked_at = -1e9

    def space_left(self) -> bool:
        """Whether the spool has more free space than the floor.

        Checked at most once a second (a statvfs per instance costs more than the rest of
        the checks). Crossing the floor either way is logged once; instances are refused
        (0xA700) while below it, and accepted again by themselves once space returns.
        """
        if not self.min_free_bytes:
            return True
        now = time.monotonic()
        if now - self._space_checked_at > 1.0:
            self._space_checked_at = now
            free = self.spool.free_bytes()
            ok = free >= self.min_free_bytes
            if ok != self._space_ok:
                if ok:
                    log.warning("spool free space back above its floor: accepting instances")
                else:
                    log.error(
                        "spool free space %d MB is below its floor of %d MB: refusing new "
                        "instances with 0xA700 until space returns",
                        free // 2**20,
                        self.min_free_bytes // 2**20,
                    )
                if self.on_floor is not None:
                    self.on_floor(not ok)
            self._space_ok = ok
        return self._space_ok

    def store(
        self,
        encoded: bytes,
        *,
        association_id: str | None,
        calling_ae_title: str,
        transfer_syntax_uid: str = "",
        sop_instance_uid: str | None = None,
        sop_class_uid: str | None = None,
    ) -> Stored:
        """Store one Part 10 stream (preamble, file meta, data set).

        ``sop_instance_uid`` and ``sop_class_uid``, when given, are what the request said it
        carries (C-STORE's Affected SOP Instance and Class UIDs); the data set must match.
        ``calling_ae_title`` is the sender's AE title (or how else it is known).
        """
        where = f"association {association_id}" if association_id else calling_ae_title

        def refuse(code: int, reason: str, header: InstanceHeader | None = None) -> Stored:
            log.warning(
                "%s: refused an instance (0x%04X): %s",
                where,
                code,
                reason,
                extra={"association_id": association_id},
            )
            self._record_refusal(association_id, code, reason)
            return Stored(code, reason, header)

        if len(encoded) > self.max_instance_bytes:
            return refuse(
                STATUS_OUT_OF_RESOURCES,
                f"instance too large: {len(encoded) / 2**20:.1f} MB, "
                f"limit {self.max_instance_bytes / 2**20:.4g} MB",
            )
        try:
            header = read_header(
                encoded, self.extra_keywords, transfer_syntax_uid=transfer_syntax_uid
            )
        except UnreadableInstanceError as exc:
            return refuse(STATUS_CANNOT_UNDERSTAND, str(exc))
        if sop_instance_uid is not None and header.sop_instance_uid != sop_instance_uid:
            return refuse(
                STATUS_CANNOT_UNDERSTAND,
                "SOP Instance UID differs from the request's Affected SOP Instance UID",
                header,
            )
        if sop_class_uid is not None and header.sop_class_uid != sop_class_uid:
            return refuse(
                STATUS_SOP_CLASS_MISMATCH,
                "SOP Class UID differs from the request's Affected SOP Class UID",
                header,
            )
        if not self.space_left():  # logged once when crossing the floor
            self._record_refusal(association_id, STATUS_OUT_OF_RESOURCES, "node storage is full")
            return Stored(STATUS_OUT_OF_RESOURCES, "node storage is full", header)
        try:
            path = self.spool.instance_path(
                header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
            )
        except InvalidUIDError as exc:
            return refuse(STATUS_CANNOT_UNDERSTAND, str(exc), header)
        replaces_file = path.exists()
        try:
            self.spool.write(path, encoded)
        except OSError as exc:
            log.error("cannot write %s: %s", path, exc)
            return refuse(STATUS_OUT_OF_RESOURCES, f"cannot store: {exc.strerror}", header)
        try:
            recorded = self.recorder.record(
                header, self.spool.stored(path), len(encoded), association_id, calling_ae_title
            )
        except Exception as exc:
            log.exception("%s: cannot record an instance", where)
            if not replaces_file:  # never delete an earlier copy that was acknowledged
                self.spool.remove(path)
            return refuse(
                STATUS_OUT_OF_RESOURCES, f"job log unavailable: {type(exc).__name__}", header
            )
        if recorded.old_path is not None:
            self.spool.remove(self.spool.locate(recorded.old_path))
        return Stored(STATUS_SUCCESS, header=header, size=len(encoded))

    def _record_refusal(self, association_id: str | None, code: int, comment: str) -> None:
        """Add an ``instance_refused`` event, so the job log says why an instance was
        refused as well as the sender's log does (best effort: the job log may be the
        reason)."""
        try:
            with self.engine.begin() as connection:
                add_event(
                    connection,
                    "instance_refused",
                    f"0x{code:04X}: {comment}",
                    association_id=association_id,
                    status=code,
                )
        except Exception:
            log.exception("cannot record a refused instance in the job log")
