"""A modality's C-ECHO and C-STORE latency while another address attacks the listener.

The node runs in this process with the shipped ``[dicom.limits]`` defaults. Cases: idle (no
attack), 50 silent TCP connections from 127.0.0.9, 20 idle associations from 127.0.0.9; in
each the modality (127.0.0.5) opens an association, sends a C-ECHO or a C-STORE of pydicom's
``CT_small.dcm`` and releases, ``--runs`` times. Then the time from the attacker closing to
its own address being served again.

Usage: ``PYTHONPATH=. .venv/bin/python benchmarks/attack.py [--runs 20]``
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicom_ai_node.config import DicomSettings, HttpSettings, Settings, StorageSettings
from dicom_ai_node.node import Node

ATTACKER, MODALITY = "127.0.0.9", "127.0.0.5"


def associate(port: int, source: str, calling: str) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", port, ae_title="AINODE", bind_address=(source, 0))


def serve_once(port: int, service: str) -> float:
    """Seconds for one association, one C-ECHO or C-STORE, release; raises if refused."""
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ds = dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    started = time.perf_counter()
    assoc = associate(port, MODALITY, "CT1")
    if not assoc.is_established:
        raise RuntimeError(f"{service}: association refused")
    status = assoc.send_c_echo() if service == "echo" else assoc.send_c_store(ds)
    assoc.release()
    if status.Status != 0:
        raise RuntimeError(f"{service}: status 0x{status.Status:04X}")
    return time.perf_counter() - started


def report(case: str, port: int, runs: int) -> None:
    for service in ("echo", "store"):
        times = sorted(serve_once(port, service) for _ in range(runs))
        print(
            f"{case:28} {service:5} median {statistics.median(times) * 1000:7.1f} ms  "
            f"max {times[-1] * 1000:7.1f} ms  ({runs} runs)"
        )


def back_within(port: int, close: Callable[[], None]) -> float:
    """Seconds from ``close()`` to the attacker's address being served again."""
    close()
    started = time.perf_counter()
    while True:
        assoc = associate(port, ATTACKER, "ATTACKER")
        if assoc.is_established:
            assoc.release()
            return time.perf_counter() - started
        time.sleep(0.01)


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def release_all(associations: list[Association]) -> None:
    for assoc in associations:
        assoc.release()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        node = Node(
            Settings(
                node_name="bench",
                dicom=DicomSettings(bind="127.0.0.1", port=0),
                http=HttpSettings(bind="127.0.0.1", port=0),
                storage=StorageSettings(data_dir=Path(tmp), min_free_mb=0),
            ),
            models={},
        )
        node.start()
        try:
            port = node.scp.port
            report("no attack", port, args.runs)
            sockets = []
            for _ in range(50):
                sock = socket.socket()
                sock.bind((ATTACKER, 0))
                sock.connect(("127.0.0.1", port))
                sockets.append(sock)
            report("50 silent TCP connections", port, args.runs)
            seconds = back_within(port, lambda: close_all(sockets))
            print(f"attacker served again {seconds * 1000:.1f} ms after closing 50 connections")
            held = [associate(port, ATTACKER, "ATTACKER") for _ in range(20)]
            report("20 idle associations", port, args.runs)
            established = [a for a in held if a.is_established]
            seconds = back_within(port, lambda: release_all(established))
            print(f"attacker served again {seconds * 1000:.1f} ms after releasing its associations")
        finally:
            node.stop()


if __name__ == "__main__":
    main()
