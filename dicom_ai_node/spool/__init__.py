"""spool: the durable store of received instances and produced results, laid out by UID.

``incoming/<study>/<series>/<sop>.dcm`` holds what was received, byte for byte as sent (a
DICOM Part 10 file: preamble, file meta, the data set as encoded on the wire);
``outbox/<study>/<series>/<sop>.dcm`` holds the results the node made. Every file is written
atomically (temporary file, fsync, rename, fsync of the folder), so a crash leaves either the
whole file or nothing, never half of one. Files hold patient data: they are readable by the
service user only (files 0600, folders 0700, whatever the umask).

Several nodes may share one spool (a network file system mounted on each host, maybe at
different paths): the job log stores paths relative to the spool's root (:meth:`Spool.stored`),
and each temporary file carries the name of the node writing it, so that a node cleaning up
after a crash removes only its own partial files and those of nodes known to be dead.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path

# PS3.5 Section 9.1: a UID is digits and dots, at most 64 characters. Only such strings are
# used as path components, so a UID cannot name "..", contain "/" or escape the spool.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TMP_PREFIX = ".tmp-"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class InvalidUIDError(ValueError):
    """A UID that does not follow PS3.5 Section 9.1 and cannot be used as a file name."""


def check_uid(uid: str, what: str) -> str:
    """Return ``uid`` if it is a valid UID (PS3.5 9.1), else raise :class:`InvalidUIDError`."""
    if not isinstance(uid, str) or len(uid) > 64 or not _UID.match(uid):
        raise InvalidUIDError(f"{what} {uid!r} is not a valid UID (PS3.5 9.1)")
    return uid


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_owner(name: str) -> str:
    """The node that wrote temporary file ``name``: ``.tmp-<32 hex>-<node>`` ("" for the
    unnamed temporary files of older versions)."""
    return name[len(_TMP_PREFIX) + 33 :]


class Spool:
    """The spool folder, as used by node ``node_name`` (its name marks its partial files)."""

    def __init__(self, root: Path, node_name: str = "") -> None:
        self.root = root
        self.node_name = _UNSAFE.sub("_", node_name)
        self.incoming = root / "incoming"
        self.outbox = root / "outbox"
        for folder in (self.incoming, self.outbox):
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
        os.chmod(root, 0o700)

    def _path(self, base: Path, study: str, series: str, sop: str) -> Path:
        return (
            base
            / check_uid(study, "Study Instance UID")
            / check_uid(series, "Series Instance UID")
            / f"{check_uid(sop, 'SOP Instance UID')}.dcm"
        )

    def instance_path(self, study: str, series: str, sop: str) -> Path:
        """Where a received instance lives."""
        return self._path(self.incoming, study, series, sop)

    def result_path(self, study: str, series: str, sop: str) -> Path:
        """Where a produced result lives."""
        return self._path(self.outbox, study, series, sop)

    def write(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically and durably (replacing any older file).

        Only returns once the content and the folder entry are on disk.
        """
        folder = path.parent
        created = not folder.is_dir()
        if created:
            for new in (folder.parent, folder):  # the study's and the series' folders
                new.mkdir(mode=0o700, exist_ok=True)
        tmp = folder / f"{_TMP_PREFIX}{uuid.uuid4().hex}-{self.node_name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(folder)
        if created:
            # New study/series folders: make their own entries durable too.
            _fsync_dir(folder.parent)
            _fsync_dir(folder.parent.parent)

    def remove(self, path: Path) -> None:
        """Delete one file of the spool, and its folders once they are empty."""
        path.unlink(missing_ok=True)
        for folder in (path.parent, path.parent.parent):
            try:
                folder.rmdir()
            except OSError:
                break

    def remove_series(self, study: str, series: str) -> None:
        """Delete one received series from the spool (and its study folder once empty)."""
        study_folder = self.incoming / check_uid(study, "Study Instance UID")
        shutil.rmtree(study_folder / check_uid(series, "Series Instance UID"), ignore_errors=True)
        with contextlib.suppress(OSError):  # other series of the study remain
            study_folder.rmdir()

    def stored(self, path: Path) -> str:
        """How the job log records ``path``: relative to the spool's root."""
        return path.relative_to(self.root).as_posix()

    def locate(self, stored: str) -> Path:
        """The file the job log records as ``stored`` (an absolute path is kept as is)."""
        return self.root / stored

    def received_files(self, settled_before: float | None = None) -> Iterator[Path]:
        """Every received instance file (for re-indexing after a crash); with
        ``settled_before`` (a POSIX time), only those last written before then."""
        for path in self.incoming.glob("*/*/*.dcm"):
            if settled_before is None or path.stat().st_mtime < settled_before:
                yield path

    def clean_temporary(self, dead_nodes: Collection[str] = ()) -> int:
        """Delete the temporary files a crash mid-write left, of this node, of the nodes
        ``dead_nodes`` and of older versions (unnamed); returns how many.

        Another live node's temporary files are files it is writing now: they stay.
        """
        owners = {"", self.node_name, *(_UNSAFE.sub("_", name) for name in dead_nodes)}
        count = 0
        for base in (self.incoming, self.outbox):
            for tmp in base.glob(f"*/*/{_TMP_PREFIX}*"):
                if _tmp_owner(tmp.name) in owners:
                    tmp.unlink(missing_ok=True)
                    count += 1
        return count

    def free_bytes(self) -> int:
        """Free space on the spool's file system, for the caller that runs as the service."""
        return shutil.disk_usage(self.root).free
