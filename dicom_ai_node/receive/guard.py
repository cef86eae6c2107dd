"""What an unauthenticated peer may hold of the listener (``[dicom.limits]``).

A TCP connection costs the node a thread from the moment it is accepted, long before the peer
has said who it is. pynetdicom counts every accepted connection against
``maximum_associations`` and waits the ACSE timeout (30 s) for its A-ASSOCIATE-RQ, so a dozen
silent connections lock every modality out. Here a connection is *pending* until its
A-ASSOCIATE-RQ PDU (PS3.8 Section 9.3.2) has arrived: pending connections have a budget of
their own (per source address and in total), a short time to send the request (the ARTIM
timer of PS3.8 Section 9.1.5, kept apart from the ACSE timeout) and are not associations yet,
so they cannot use up ``maximum_associations``. A pending connection that closes frees its
slot at once. Once requested, an association counts against per-address and per-calling-AE
limits, and a peer that sends slower than a floor byte rate mid-PDU is cut off.

Every refusal is logged with its reason and counted in
``dicom_ai_node_connections_refused_total{reason}``; the job log gets one
``connection_refused`` event per source and reason a minute (and 60 a minute in all), which
the destinations page lists as "refused sources" (so an attacker cannot turn refusals into a
write per packet).
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from dicom_ai_node.config import ConnectionLimits
from dicom_ai_node.receive.access import AddressPolicy
from dicom_ai_node.receive.reactor import ContextTemplates, ReactiveRequestHandler

log = logging.getLogger(__name__)

A_ASSOCIATE_RQ = 0x01  # PDU type, PS3.8 Section 9.3.2
# The first bytes of the A-ASSOCIATE-RQ to wait for before it becomes an association: all of a
# usual request; a longer one (many contexts) gets the ACSE timeout for its remainder.
PEEK_BYTES = 32768
PENDING_POLL_SECONDS = 0.01
EVENT_EVERY_SECONDS = 60.0
MAX_EVENTS_PER_MINUTE = 60  # in all: many addresses (an IPv6 /64) cannot flood the job log

Recorder = Callable[[str, str, str], None]
"""Called with (address, reason, message) to put a refusal in the job log."""


class _Metered:
    """A socket whose ``recv`` cuts off a peer slower than ``min_bytes_per_second``.

    pynetdicom reads from the socket only when the DUL has seen data ready or in the middle
    of a PDU, so the time ``recv`` spends blocked is time the node waits for a PDU that the
    peer has begun. Over the whole connection that time may not exceed ``grace`` plus the
    bytes it brought divided by the floor rate; a ``recv`` that would go past it times out,
    which pynetdicom treats as a closed transport connection (Evt17).
    """

    _floor: float = 0.0
    _grace: float = 0.0
    _blocked: float = 0.0
    _blocked_bytes: int = 0
    _on_slow: Callable[[], None] | None = None

    def meter(self, floor: float, grace: float, on_slow: Callable[[], None]) -> None:
        self._floor, self._grace, self._on_slow = floor, grace, on_slow

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if not self._floor:
            return super().recv(buflen, flags)  # type: ignore[misc,no-any-return]
        allowed = self._grace + self._blocked_bytes / self._floor - self._blocked
        sock: Any = self
        sock.settimeout(max(allowed, 0.001))
        started = time.monotonic()
        try:
            data: bytes = super().recv(buflen, flags)  # type: ignore[misc]
        except TimeoutError:
            if self._on_slow is not None:
                self._on_slow()
                self._on_slow = None
            raise
        finally:
            self._blocked += time.monotonic() - started
        self._blocked_bytes += len(data)
        return data


class MeteredSocket(_Metered, socket.socket):
    """A plain TCP connection with the floor rate of :class:`_Metered`."""


class MeteredSSLSocket(_Metered, ssl.SSLSocket):
    """A TLS connection with the floor rate of :class:`_Metered`."""


class ConnectionGuard:
    """The budgets of one listener, shared by its connection threads (thread-safe).

    ``count`` is called with each refusal's reason (the metrics); ``record`` puts one a
    minute per source and reason in the job log.
    """

    def __init__(
        self,
        limits: ConnectionLimits,
        addresses: AddressPolicy,
        count: Callable[[str], None] | None = None,
        record: Recorder | None = None,
    ) -> None:
        self.limits = limits
        self.addresses = addresses
        self._count = count
        self._record = record
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()
        self._by_address: Counter[str] = Counter()
        self._by_ae: Counter[str] = Counter()
        self._open: dict[int, tuple[str, str]] = {}
        self._recorded: dict[tuple[str, str], float] = {}
        self._minute = (0.0, 0)  # start of the current minute, events recorded in it

    def refuse(self, address: str, reason: str, message: str) -> None:
        """Log, count and (at most once a minute per source and reason, and
        :data:`MAX_EVENTS_PER_MINUTE` in all) record a refusal."""
        log.warning("refused %s: %s (%s)", address, message, reason)
        if self._count is not None:
            self._count(reason)
        now = time.monotonic()
        with self._lock:
            last = self._recorded.get((address, reason))
            if last is not None and now - last < EVENT_EVERY_SECONDS:
                return
            started, recorded = self._minute
            if now - started >= EVENT_EVERY_SECONDS:
                started, recorded = now, 0
            if recorded >= MAX_EVENTS_PER_MINUTE:
                return
            self._minute = (started, recorded + 1)
            if len(self._recorded) > 1000:
                self._recorded.clear()
            self._recorded[(address, reason)] = now
        if self._record is not None:
            self._record(address, reason, message)

    # --- before the A-ASSOCIATE-RQ ---------------------------------------------------------

    def connect(self, address: str) -> bool:
        """Whether a new TCP connection from ``address`` may wait for its request; if so it
        holds a pending slot until :meth:`settled`."""
        if not self.addresses.may_connect(address):
            self.refuse(address, "address_not_allowed", "no AE title may connect from there")
            return False
        limits = self.limits
        with self._lock:
            if self._pending[address] >= limits.max_pending_per_address:
                reason = "pending_per_address"
            elif sum(self._pending.values()) >= limits.max_pending:
                reason = "pending_total"
            else:
                self._pending[address] += 1
                return True
        self.refuse(address, reason, "too many connections waiting to request an association")
        return False

    @property
    def pending(self) -> int:
        """How many accepted connections are waiting for their A-ASSOCIATE-RQ now."""
        with self._lock:
            return sum(self._pending.values())

    def settled(self, address: str) -> None:
        with self._lock:
            self._pending[address] -= 1
            if self._pending[address] <= 0:
                del self._pending[address]

    # --- associations ----------------------------------------------------------------------

    def admit(self, assoc: Association) -> str | None:
        """Count a requested association against its source's limits: ``None`` when it may
        go on, else the reason to reject it."""
        primitive = assoc.requestor.primitive
        assert primitive is not None
        address, calling = assoc.requestor.address, str(primitive.calling_ae_title).strip()
        limits = self.limits
        with self._lock:
            if id(assoc) in self._open:
                return None
            if self._by_address[address] >= limits.max_associations_per_address:
                reason = "associations_per_address"
            elif self._by_ae[calling] >= limits.max_associations_per_ae:
                reason = "associations_per_ae"
            else:
                self._open[id(assoc)] = (address, calling)
                self._by_address[address] += 1
                self._by_ae[calling] += 1
                return None
        self.refuse(address, reason, f"too many associations open ({calling})")
        return reason

    def ended(self, assoc: Association) -> None:
        """An association ended (called for each of release, abort, close: idempotent)."""
        with self._lock:
            entry = self._open.pop(id(assoc), None)
            if entry is None:
                return
            address, calling = entry
            for counts, key in ((self._by_address, address), (self._by_ae, calling)):
                counts[key] -= 1
                if counts[key] <= 0:
                    del counts[key]


def await_request(sock: socket.socket, deadline: float) -> str | None:
    """Wait until the start of an A-ASSOCIATE-RQ PDU has arrived (without reading it).

    Returns ``None`` when it has (the whole PDU, or its first :data:`PEEK_BYTES`), else why
    not: ``pre_association_timeout``, ``closed`` or ``not_an_association_request``. Over TLS
    the bytes cannot be peeked, so the first decrypted data is what is waited for.
    """
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "pre_association_timeout"
        encrypted = isinstance(sock, ssl.SSLSocket)
        if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            ready, _, _ = select.select([sock], [], [], remaining)
            if not ready:
                return "pre_association_timeout"
        if encrypted:
            return None
        try:
            data = sock.recv(PEEK_BYTES, socket.MSG_PEEK)
        except OSError:
            return "closed"
        if not data:
            return "closed"
        if data[0] != A_ASSOCIATE_RQ:
            return "not_an_association_request"
        if len(data) >= 6 and len(data) >= min(6 + struct.unpack(">L", data[2:6])[0], PEEK_BYTES):
            return None
        time.sleep(PENDING_POLL_SECONDS)  # part of the PDU is there: wait for the rest


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a :class:`ConnectionGuard` in front.

    ``get_request`` only accepts (pynetdicom's would do the TLS handshake there, on the one
    accepting thread, with no timeout); ``verify_request`` applies the source address and the
    pending budgets before the connection gets a thread; the connection's own thread does the
    TLS handshake and waits for the A-ASSOCIATE-RQ, both within
    ``pre_association_timeout``, and only then hands the socket to pynetdicom, which makes
    it an association.
    """

    daemon_threads = True  # ThreadingMixIn.server_close joins only non-daemon threads
    # The kernel's queue of connections not yet accepted (listen backlog; socketserver's
    # default is 5): a burst beyond it has its SYNs dropped, and every peer's connect then
    # waits the SYN retransmission time (1 s, then 2 s...) however fast the node accepts.
    request_queue_size = 128
    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: Connections accepted whose thread has not yet made them an association.
        self._preparing = 0
        self._preparing_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        """Bind, or take the listening socket the AE was given (shared by the receiver
        processes of a node). That one is non-blocking: several processes wait on it, the
        first to accept gets the connection and the others' ``accept`` fails at once with
        ``BlockingIOError``, which socketserver ignores, instead of blocking the loop."""
        listener = cast(GuardedAE, self.ae).listener
        if listener is None:
            super().server_bind()
            return
        assert self.socket is not None
        self.socket.close()
        self.socket = listener.dup()
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; on a socket shared with other receiver processes, the later
        the more connections this one holds (see :attr:`GuardedAE.shared`)."""
        assert self.socket is not None
        if cast(GuardedAE, self.ae).shared:
            held = self._preparing + len(self.ae.active_associations)
            if held:
                time.sleep(held * sys.getswitchinterval())
        connection, address = self.socket.accept()
        return connection, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.guard.connect(str(client_address[0]))

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the connection's thread, counted in :attr:`_preparing` until pynetdicom
        has made it an association (whose thread is then counted instead)."""
        with self._preparing_lock:
            self._preparing += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._prepared()
            raise

    def _prepared(self) -> None:
        with self._preparing_lock:
            self._preparing -= 1

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self._process(request, client_address)
        finally:
            self._prepared()

    def _process(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        limits = self.guard.limits
        try:
            connection = self._prepare(
                request, address, time.monotonic() + limits.pre_association_timeout
            )
        finally:
            self.guard.settled(address)
        if connection is None:
            return
        if self.socket is None or self.socket.fileno() == -1:  # stopped meanwhile
            connection.close()
            return

        def slow() -> None:
            self.guard.refuse(address, "below_floor_rate", "sent slower than the floor rate")

        connection.meter(limits.min_bytes_per_second, limits.slow_sender_grace_seconds, slow)
        super().process_request_thread(connection, client_address)

    def _prepare(
        self, request: socket.socket, address: str, deadline: float
    ) -> MeteredSocket | MeteredSSLSocket | None:
        """The connection as pynetdicom will use it, once its request has begun; ``None`` (and
        the connection closed) when it did not in time."""
        connection: socket.socket
        try:
            if self.ssl_context is not None:
                request.settimeout(max(deadline - time.monotonic(), 0.001))
                connection = self.ssl_context.wrap_socket(request, server_side=True)
            else:
                connection = MeteredSocket(
                    request.family, request.type, request.proto, fileno=request.detach()
                )
            connection.settimeout(None)
        except OSError as exc:  # ssl.SSLError and TimeoutError included
            self.guard.refuse(address, "tls_handshake", f"TLS handshake failed: {exc}")
            request.close()  # after counting: the peer sees the close once it is counted
            return None
        reason = await_request(connection, deadline)
        if reason is None:
            assert isinstance(connection, MeteredSocket | MeteredSSLSocket)
            return connection
        if reason != "closed":
            self.guard.refuse(address, reason, "no A-ASSOCIATE-RQ in time")
        connection.close()
        return None


class GuardedAE(AE):
    """A pynetdicom AE whose listeners are :class:`GuardedServer` with ``guard``, on
    ``listener`` when given (see :meth:`GuardedServer.server_bind`), and whose associations
    wait on their sockets instead of polling them (:mod:`~dicom_ai_node.receive.reactor`).

    ``shared``: other processes accept on ``listener`` too. The kernel wakes all of them for
    each connection and the first to call ``accept`` gets it, which is as often a process
    already busy as an idle one: four senders into two receivers were split three to one in
    2 of 5 runs, and then took 1.19-1.31x one sender's rate against 1.42-1.64x when split two
    and two. So a process that holds connections waits one interpreter switch interval (the
    longest its accepting thread may wait for the interpreter lock, 5 ms) per connection
    held before it accepts, which lets the least busy process take the connection first.
    """

    def __init__(
        self,
        guard: ConnectionGuard,
        ae_title: str,
        listener: socket.socket | None = None,
        shared: bool = False,
    ) -> None:
        super().__init__(ae_title=ae_title)
        self.guard = guard
        self.listener = listener
        self.shared = shared

    def make_server(  # type: ignore[override]
        self,
        address: tuple[str, int],
        ae_title: str | None = None,
        contexts: Any = None,
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: Any = None,
        server_class: Any = None,
        **kwargs: Any,
    ) -> Any:
        if ssl_context is not None:
            ssl_context.sslsocket_class = MeteredSSLSocket
        server = super().make_server(
            address,
            ae_title,
            contexts,
            ssl_context,
            evt_handlers,
            GuardedServer,
            request_handler=ReactiveRequestHandler,
            **kwargs,
        )
        assert isinstance(server, GuardedServer)
        server.guard = self.guard
        server.contexts = ContextTemplates(server.contexts)
        return server
