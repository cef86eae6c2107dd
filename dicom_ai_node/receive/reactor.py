"""pynetdicom's DICOM Upper Layer reactor, woken by its socket instead of polling it.

pynetdicom runs each association's Upper Layer (PS3.8 Section 9) as a thread that loops:
send what the association queued, else look at the socket (a ``select`` that does not
wait), else sleep ``_run_loop_delay`` and look again. An idle association therefore wakes
thousands of times a second: measured with a bare pynetdicom SCP at the 0.1 ms the node
used to set (for one sender's latency), one idle association cost 0.15 of a core and four
cost 0.51, CPU taken from the handlers of the same process and from the other processes of a
2-core machine. :class:`ReactiveDUL` keeps pynetdicom's loop and state machine and changes
only where it waits: the look at the socket blocks until the socket is readable or another
thread queues something for the reactor (a primitive to send, an event for the state
machine, a stop), which writes a byte to a pipe the same ``select`` watches. The loop's own
sleep is then zero. The wait is bounded (:data:`MAX_WAIT_SECONDS`, and the ARTIM timer's
time left, PS3.8 Section 9.1.5), so a timer is seen in time whatever happens. Measured the
same way, one idle association then cost 0.03 of a core and four 0.09: what is left is
pynetdicom's association thread, which loops every millisecond. The reactor also knows
whether the last PDU was the peer's or its own answer, and when
(:meth:`ReactiveDUL.idle_seconds`), which a stop uses to tell an idle association from a
busy one.

Making an association costs little too: :class:`ContextTemplates` gives it its own copy of
the presentation contexts the node supports without recreating their UIDs.

This leans on pynetdicom 3.0's internals (the loop's ``_is_transport_event`` and
``_process_recv_primitive`` steps, the request handler's ``_create_association`` and its
``deepcopy`` of the server's ``contexts``, a context's ``_transfer_syntax`` list); the
dependency is pinned below 4 and every receive test runs through it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import select
import ssl
import threading
import time
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import RequestHandler

#: The longest the reactor waits for its socket or queues before looking at its timers.
MAX_WAIT_SECONDS = 0.05
#: The shortest: a timer past its time is looked at every millisecond, never in a spin.
MIN_WAIT_SECONDS = 0.001


class _WakingQueue(queue.Queue[Any]):
    """A queue that wakes its reactor when another thread puts into it."""

    def __init__(self, dul: ReactiveDUL) -> None:
        super().__init__()
        self._dul = dul

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if threading.current_thread() is not self._dul:
            self._dul.wake()


class ReactiveDUL(DULServiceProvider):
    """A DUL service provider whose reactor blocks on its socket and a wake-up pipe (see the
    module's docstring)."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_lock = threading.Lock()
        self._wake_read = self._wake_write = -1  # the pipe lives as long as the reactor runs
        self.event_queue = _WakingQueue(self)
        self.to_provider_queue = _WakingQueue(self)
        self._run_loop_delay = 0.0
        self._reading = False
        self._last_sent: float | None = None

    def wake(self) -> None:
        """Make the reactor's current or next wait return at once."""
        with self._wake_lock:
            if self._wake_write < 0:
                return  # the reactor has not begun (it looks at its queues first) or ended
            with contextlib.suppress(BlockingIOError):  # full: the reactor is woken already
                os.write(self._wake_write, b"\0")

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self.wake()
        return super().stop_dul()

    def run_reactor(self) -> None:
        with self._wake_lock:
            self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            super().run_reactor()
        finally:
            with self._wake_lock:
                os.close(self._wake_read)
                os.close(self._wake_write)
                self._wake_read = self._wake_write = -1

    def _is_transport_event(self) -> bool:
        self._wait()
        self._reading = True
        try:
            received = bool(super()._is_transport_event())
        finally:
            self._reading = False
        if received:
            self._last_sent = None
        return received

    def _process_recv_primitive(self) -> bool:
        sent = bool(super()._process_recv_primitive())
        if sent:
            self._last_sent = time.monotonic()
        return sent

    def idle_seconds(self) -> float:
        """Seconds since this side last sent a PDU, if the peer has sent none since; 0 while
        a PDU is being read or one received is not yet answered (a request being handled,
        or a message the peer has only begun)."""
        last_sent = self._last_sent
        if self._reading or last_sent is None:
            return 0.0
        return time.monotonic() - last_sent

    def _wait(self) -> None:
        """Block until the socket is readable, something is queued, or a timer may be due.

        Without a usable socket (closed, or not yet given) only the pipe is watched, so
        that a reactor left running until it is stopped sleeps rather than spins."""
        if not self.event_queue.empty() or self._kill_thread:
            return
        watched: list[Any] = [self._wake_read]
        sock = self.socket.socket if self.socket is not None else None
        if sock is not None and sock.fileno() >= 0:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # TLS data already decrypted, which select cannot see
            watched.append(sock)
        timeout = MAX_WAIT_SECONDS
        artim = self.artim_timer
        if artim.timeout is not None and artim._start_time is not None and artim._end_time is None:
            timeout = min(timeout, max(artim.remaining, MIN_WAIT_SECONDS))
        try:
            readable, _, _ = select.select(watched, [], [], timeout)
        except (OSError, ValueError):
            return  # the socket closed under us: pynetdicom's own look reports it (Evt17)
        if self._wake_read in readable:
            with contextlib.suppress(BlockingIOError):  # emptied
                while os.read(self._wake_read, 4096):
                    pass


class ReactiveRequestHandler(RequestHandler):
    """pynetdicom's request handler, making associations with a :class:`ReactiveDUL`."""

    def _create_association(self) -> Association:
        assoc: Association = super()._create_association()
        polling = assoc.dul
        dul = ReactiveDUL(assoc)
        dul.socket = polling.socket
        dul.artim_timer = polling.artim_timer  # with the association's timeouts set
        dul._idle_timer = polling._idle_timer
        queues: list[tuple[queue.Queue[Any], queue.Queue[Any]]] = [
            (polling.event_queue, dul.event_queue),  # the socket's Evt5 (PS3.8 9.2.3)
            (polling.to_provider_queue, dul.to_provider_queue),
        ]
        for old, new in queues:
            while not old.empty():
                new.put(old.get_nowait())
        assoc.dul = dul
        return assoc


class ContextTemplates(list[PresentationContext]):
    """The presentation contexts a server supports, as the templates each association's
    negotiation reads (PS3.8 Section 9.3.3.2), copied cheaply.

    pynetdicom gives every association a ``deepcopy`` of the server's contexts, and a deep
    copy rebuilds each UID, validating it again: for every storage SOP class with every
    transfer syntax (170 contexts, 7650 UIDs) that was 48 ms of CPU per association here,
    the cost of about ten received CT images. UIDs are immutable strings, so an association
    gets new contexts holding new lists of the same UIDs, which is all it may change.
    Install with ``server.contexts = ContextTemplates(server.contexts)``.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            clone = copy.copy(context)
            clone._transfer_syntax = list(context.transfer_syntax)
            copies.append(clone)
        return copies
