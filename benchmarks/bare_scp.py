"""The floors for ingest: bare pynetdicom Storage SCPs that do the least a receiver can.

Run by ``benchmarks/ingest.py`` as processes of their own, so that they pay for pynetdicom's
association handling (PS3.8) and the DIMSE C-STORE exchange (PS3.7 9.1.1) exactly as the node
does. They take the node's network settings (unlimited PDU size, as ``[dicom] maximum_pdu_size
= 0``; the node's association reactor, which waits on its socket instead of polling it, and
its cheap copy of the presentation contexts per association), so that the gap to the node is
the cost of the node's own code. Two kinds:

- ``write`` (the floor of issue 10): write and fsync each file, nothing else: no header
  parse, no job log, no atomic rename.
- ``checked``: what any receiver that keeps the node's promises must do before it answers,
  and nothing more: parse the header with pydicom (the four UIDs that name the file and
  decide the statuses of PS3.4 B.2.3), then write the file atomically and durably (temporary
  file, fsync, rename, fsync of the folder: the node's ``Spool.write``). No job log.

``--processes N`` runs N such processes on one listening socket, as the node's receivers
share theirs (and with their turns at accepting, see ``receive/guard.py``), so that several
senders can be measured against the same number of processes as the node's.

Usage: ``python benchmarks/bare_scp.py PORT FOLDER [--kind write|checked] [--processes N]``
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dicom_ai_node.config import ConnectionLimits  # noqa: E402
from dicom_ai_node.receive.access import AddressPolicy  # noqa: E402
from dicom_ai_node.receive.guard import ConnectionGuard, GuardedAE  # noqa: E402
from dicom_ai_node.receive.reactor import ContextTemplates, ReactiveRequestHandler  # noqa: E402
from dicom_ai_node.spool import Spool  # noqa: E402
from dicom_ai_node.supervisor import listen  # noqa: E402

UIDS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]
STATUS_CANNOT_UNDERSTAND = 0xC000  # PS3.4 B.2.3


class BareAE(AE):
    """pynetdicom's AE with the node's association reactor and its cheap copies of the
    presentation contexts per association (see ``receive/reactor.py``)."""

    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        server = super().make_server(*args, request_handler=ReactiveRequestHandler, **kwargs)
        server.contexts = ContextTemplates(server.contexts)
        return server


def write_only(folder: Path) -> Any:
    """The ``write`` handler: the data set as received, written and fsynced."""

    def on_store(event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        fd = os.open(
            folder / f"{request.AffectedSOPInstanceUID}.dcm", os.O_WRONLY | os.O_CREAT, 0o600
        )
        try:
            os.write(fd, event.encoded_dataset())
            os.fsync(fd)
        finally:
            os.close(fd)
        return 0x0000

    return on_store


def checked(folder: Path) -> Any:
    """The ``checked`` handler: header parsed, file written atomically under its UIDs."""
    spool = Spool(folder, "bare")

    def on_store(event: evt.Event) -> int:
        encoded = event.encoded_dataset()
        try:
            ds = dcmread(BytesIO(encoded), stop_before_pixels=True, specific_tags=UIDS)
            path = spool.instance_path(*(str(ds[name].value) for name in UIDS[2:] + UIDS[1:2]))
        except Exception:
            return STATUS_CANNOT_UNDERSTAND
        spool.write(path, encoded)
        return 0x0000

    return on_store


def serve(port: int, folder: Path, kind: str, processes: int) -> None:
    """Listen on ``port``; with ``processes`` > 1, in that many children sharing the socket
    (this process waits, and stops them when it is terminated)."""
    handler = (write_only if kind == "write" else checked)(folder)
    ae: AE
    if processes == 1:
        ae, address = BareAE(ae_title="BARESCP"), ("127.0.0.1", port)
    else:
        listener = listen("127.0.0.1", port)
        children: list[int] = []
        while len(children) < processes and (pid := os.fork()):
            children.append(pid)
        if len(children) == processes:  # the parent
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            try:
                os.wait()
            finally:
                for pid in children:
                    os.kill(pid, signal.SIGKILL)
            return
        # every sender comes from 127.0.0.1 with one AE title: allow them all at once
        limits = ConnectionLimits(
            max_pending_per_address=64,
            max_pending=64,
            max_associations_per_address=64,
            max_associations_per_ae=64,
            min_bytes_per_second=0,
        )
        ae = GuardedAE(ConnectionGuard(limits, AddressPolicy({})), "BARESCP", listener, True)
        address = cast(tuple[str, int], listener.getsockname())
    ae.maximum_pdu_size = 0
    ae.maximum_associations = 64
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.start_server(address, evt_handlers=[(evt.EVT_C_STORE, handler)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--kind", choices=("write", "checked"), default="write")
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    serve(args.port, args.folder, args.kind, args.processes)


if __name__ == "__main__":
    main()
