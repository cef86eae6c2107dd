"""A hostile peer on the network cannot lock modalities out of the listener (receive/guard.py).

The attacker is 127.0.0.9 and the modality 127.0.0.5: loopback has a whole /8, so each is
"another host" to the node. Every check of the modality's service is measured, with a bound
(2 s) far above what the node needs when it is not locked out (milliseconds): a lock-out
shows as a rejection or a wait of the ACSE timeout (30 s), not as a slow answer.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from dicom_ai_node.config import ConnectionLimits
from dicom_ai_node.jobs.models import Event
from dicom_ai_node.node import Node
from dicom_ai_node.receive.access import AddressPolicy
from dicom_ai_node.receive.guard import MAX_EVENTS_PER_MINUTE, ConnectionGuard
from tests.support.helpers import instance, wait_for

ATTACKER = "127.0.0.9"
MODALITY = "127.0.0.5"
BOUND = 2.0


def refused(node: Node, reason: str) -> float:
    value = node.metrics.registry.get_sample_value(
        "dicom_ai_node_connections_refused_total", {"reason": reason}
    )
    return value or 0.0


def associate(node: Node, source: str, calling: str = "ATTACKER") -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", node.scp.port, ae_title="AINODE", bind_address=(source, 0))


def modality_is_served(node: Node) -> None:
    """C-ECHO and C-STORE from the modality, each answered with success within the bound."""
    for service in ("echo", "store"):
        started = time.monotonic()
        assoc = associate(node, MODALITY, "CT1")
        assert assoc.is_established, f"{service}: association not accepted"
        status = assoc.send_c_echo() if service == "echo" else assoc.send_c_store(instance())
        assoc.release()
        elapsed = time.monotonic() - started
        assert status.Status == 0x0000
        assert elapsed < BOUND, f"{service} took {elapsed:.2f} s"


@contextmanager
def idle_connections(node: Node, count: int) -> Iterator[list[socket.socket]]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((ATTACKER, 0))
            sock.connect(("127.0.0.1", node.scp.port))
            sockets.append(sock)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def closed_by_node(sock: socket.socket) -> bool:
    """Whether the node closes ``sock`` (within 10 s) without sending anything; a close with
    bytes still unread shows as a reset."""
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def accepted_again_within_a_second(node: Node) -> None:
    """The attacker's address is served again (it is a source like any other) within 1 s."""
    started = time.monotonic()

    def echo() -> bool:
        assoc = associate(node, ATTACKER)
        ok = assoc.is_established and assoc.send_c_echo().Status == 0x0000
        if assoc.is_established:
            assoc.release()
        return ok

    wait_for(echo, timeout=10)
    assert time.monotonic() - started < 1.0


def test_fifty_idle_connections_do_not_lock_out_a_modality(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory()
    limits = node.settings.dicom.limits
    with idle_connections(node, 50):
        # the connections beyond the per-address budget are closed as they are accepted
        wait_for(
            lambda: refused(node, "pending_per_address") >= 50 - limits.max_pending_per_address
        )
        for _ in range(3):
            modality_is_served(node)
    accepted_again_within_a_second(node)
    with node.read_sessions() as session:
        events = list(session.scalars(select(Event).where(Event.kind == "connection_refused")))
    # one event per source and reason a minute, however many refusals
    sources = [(e.data["address"], e.data["reason"]) for e in events]
    assert sources.count((ATTACKER, "pending_per_address")) == 1
    assert len(set(sources)) == len(sources)


def test_twenty_idle_associations_do_not_lock_out_a_modality(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory()
    per_address = node.settings.dicom.limits.max_associations_per_address
    held = [associate(node, ATTACKER) for _ in range(20)]
    try:
        assert sum(a.is_established for a in held) == per_address
        assert sum(a.is_rejected for a in held) == 20 - per_address
        rejection = next(a for a in held if a.is_rejected).acceptor.primitive
        assert rejection is not None
        # PS3.8 9.3.4: rejected-transient, UL service-provider (presentation), local limit
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
        assert refused(node, "associations_per_address") == 20 - per_address
        # the same AE title from elsewhere is held to the per-AE limit
        other = associate(node, "127.0.0.6")
        assert other.is_rejected
        assert refused(node, "associations_per_ae") == 1
        for _ in range(3):
            modality_is_served(node)
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
    accepted_again_within_a_second(node)


def test_silent_and_unlisted_connections_are_closed(node_factory: Callable[..., Node]) -> None:
    node = node_factory(
        dicom={
            "allowed_addresses": {"CT1": [MODALITY], "*": ["127.0.0.1", ATTACKER]},
            "limits": {"pre_association_timeout": 0.3},
        }
    )
    # from an address that no AE title may use: closed at accept, before anything is read
    with socket.create_connection(
        ("127.0.0.1", node.scp.port), source_address=("127.0.0.7", 0)
    ) as s:
        assert closed_by_node(s)
    assert refused(node, "address_not_allowed") == 1
    # silent: dropped after the pre-association timeout, without an association
    with idle_connections(node, 1) as (sock,):
        assert closed_by_node(sock)
    assert refused(node, "pre_association_timeout") == 1
    # an HTTP request is not an A-ASSOCIATE-RQ (PDU type 0x01)
    with socket.create_connection(("127.0.0.1", node.scp.port), source_address=(ATTACKER, 0)) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert closed_by_node(s)
    assert refused(node, "not_an_association_request") == 1
    modality_is_served(node)
    assert node.metrics.registry.get_sample_value("dicom_ai_node_associations_total") == 2


def test_a_sender_below_the_floor_rate_is_cut_off(node_factory: Callable[..., Node]) -> None:
    node = node_factory(
        dicom={"limits": {"min_bytes_per_second": 1000, "slow_sender_grace_seconds": 0.5}}
    )
    assoc = associate(node, ATTACKER)
    assert assoc.is_established
    sock = assoc.dul.socket
    assert sock is not None and sock.socket is not None
    raw = sock.socket
    # a P-DATA-TF PDU (PS3.8 9.3.5) that announces 100 kB, then one byte every 20 ms
    raw.sendall(struct.pack(">BBL", 0x04, 0, 100_000))
    for _ in range(500):
        if refused(node, "below_floor_rate"):
            break
        try:
            raw.sendall(b"\0")
        except OSError:
            break
        time.sleep(0.02)
    wait_for(lambda: refused(node, "below_floor_rate") == 1)
    wait_for(lambda: not assoc.is_alive())
    modality_is_served(node)


def test_refusals_reach_the_job_log_at_a_bounded_rate() -> None:
    recorded: list[tuple[str, str]] = []
    counted: list[str] = []
    guard = ConnectionGuard(
        ConnectionLimits(),
        AddressPolicy({}),
        counted.append,
        lambda address, reason, message: recorded.append((address, reason)),
    )
    for _ in range(3):
        guard.refuse("10.0.0.1", "pending_per_address", "too many")
    guard.refuse("10.0.0.1", "pre_association_timeout", "silent")
    for n in range(200):  # many addresses (say an IPv6 /64)
        guard.refuse(f"fd00::{n:x}", "pending_per_address", "too many")
    assert len(counted) == 204  # every refusal counted in the metrics
    assert recorded[:2] == [
        ("10.0.0.1", "pending_per_address"),
        ("10.0.0.1", "pre_association_timeout"),
    ]
    assert len(recorded) == MAX_EVENTS_PER_MINUTE


def test_an_idle_association_is_aborted_after_the_network_timeout(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory(dicom={"network_timeout": 0.5})
    idle = associate(node, ATTACKER)
    assert idle.is_established
    wait_for(lambda: idle.is_aborted, timeout=10)  # the node's idle timer: A-ABORT
    wait_for(
        lambda: node.metrics.registry.get_sample_value("dicom_ai_node_associations_active") == 0
    )
    modality_is_served(node)
