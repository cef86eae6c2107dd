"""The floor for ingest: a bare pynetdicom Storage SCP that only writes and fsyncs each file.

Run by ``benchmarks/ingest.py`` as a process of its own, so that it pays for pynetdicom's
association handling (PS3.8) and the DIMSE C-STORE exchange (PS3.7 9.1.1) exactly as the node
does, and for nothing else: no header parse, no job log, no atomic rename. It takes the
node's network settings (unlimited PDU size, as ``[dicom] maximum_pdu_size = 0``, and the
node's association reactor, which waits on its socket instead of polling it), so that the
gap to the node is the cost of the node's own code.

Usage: ``python benchmarks/bare_scp.py PORT FOLDER``
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dicom_ai_node.receive.reactor import ReactiveRequestHandler  # noqa: E402


class BareAE(AE):
    """pynetdicom's AE with the node's association reactor (see ``receive/reactor.py``)."""

    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        return super().make_server(*args, request_handler=ReactiveRequestHandler, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    folder: Path = args.folder

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

    ae = BareAE(ae_title="BARESCP")
    ae.maximum_pdu_size = 0
    ae.maximum_associations = 64
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.start_server(
        ("127.0.0.1", args.port),
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )


if __name__ == "__main__":
    main()
