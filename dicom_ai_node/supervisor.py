"""``serve``: a small supervisor that runs the node's roles in processes of their own.

Each role (``receive``, ``work``, ``dispatch``, ``notify``, ``web``) runs in child processes
(``[processes]`` sets how many), so a worker's TensorFlow and the receivers do not share one
interpreter lock. The children are forked by a multiprocessing fork server that has imported
the node's modules once (TensorFlow aside, which only a worker imports, after the fork): a
child, first or restarted, starts in milliseconds instead of the second its imports take,
and the fork server holds no thread, socket or database connection for it to inherit. The
supervisor does what the node does once (:class:`~dicom_ai_node.node.NodeDuties`:
migrate, recover, heartbeat) and opens the DICOM socket, which every receiver process
inherits and accepts on. It holds no job: everything is in the job log.

A child that dies is restarted after a backoff that doubles while it keeps dying, logged, and
shown by ``/healthz`` and ``/metrics`` (:mod:`dicom_ai_node.processes`); before the restart
its associations are closed and its jobs judged by the crash policy. A child that exits with
status 2 (a configuration error) is not restarted: the supervisor stops and exits 2.

On SIGTERM or SIGINT the roles are drained in the order of the data flow: receivers stop
accepting and finish their associations, then workers finish their jobs (or leave them to
be judged as interrupted), then dispatchers finish the file in flight, then notify and web;
each role gets ``[processes] drain_seconds`` before it is killed. Children ignore SIGINT (a
Ctrl-C reaches the whole process group) and die with the supervisor if it is killed (see
:func:`become_child`): a node is gone as a whole, as when its host fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from prometheus_client.multiprocess import mark_process_dead

from dicom_ai_node.config import ROLES, Role, Settings
from dicom_ai_node.jobs.crashes import CrashRecords
from dicom_ai_node.jobs.db import create_db_engine, session_factory
from dicom_ai_node.jobs.queue import AttemptLimits
from dicom_ai_node.node import NodeDuties
from dicom_ai_node.processes import ChildState, ProcessStatus
from dicom_ai_node.spool import Spool

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# what the fork server imports once for every child: the CLI (the children's entry point) and
# all the stages the node wires (not TensorFlow or ONNX Runtime: a worker loads them itself)
PRELOAD = ["dicom_ai_node.cli", "dicom_ai_node.node"]
_FORKSERVER = multiprocessing.get_context("forkserver")
CONFIG_ERROR = 2  # the exit status of a child that cannot run with its configuration
POLL_SECONDS = 0.2
LISTEN_BACKLOG = 128


@dataclass(frozen=True)
class ChildSpec:
    """What a child process is given: its role and slot, the supervisor's settings, the
    DICOM socket (receivers), the end of a pipe to say it is ready and the end of a pipe that
    reads end-of-file once the supervisor has exited.

    The settings are those the supervisor loaded at its start, not the configuration file
    read again: a child restarted after someone edited the file runs as its siblings do, and
    a file left half-edited cannot stop the node at a child's next restart."""

    role: Role
    slot: int
    settings: Settings
    listener: socket.socket | None
    ready: Connection
    lifeline: Connection


@dataclass
class _Child:
    """One process slot of a role and the process in it."""

    role: Role
    slot: int
    proc: BaseProcess | None = None
    ready_pipe: Connection | None = None  # read end; the child writes to it once it is ready
    started: float = 0.0
    restart_at: float = 0.0
    deaths_in_row: int = 0
    state: ChildState = field(init=False)

    def __post_init__(self) -> None:
        self.state = ChildState(self.role, self.slot, None, running=False)


def describe_exit(code: int) -> str:
    """A child's exit status in words: ``killed by SIGKILL``, ``exit status 1``."""
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def listen(bind: str, port: int) -> socket.socket:
    """The node's DICOM socket, bound and listening, to be inherited by its receivers."""
    sock = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"DICOM port {bind}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


class Supervisor:
    """Runs ``roles`` of the node in child processes until :meth:`run`'s event is set; each
    child runs ``child_main(spec)`` and exits with :data:`CONFIG_ERROR` if it cannot run with the
    configuration."""

    def __init__(
        self,
        settings: Settings,
        roles: tuple[Role, ...],
        child_main: Callable[[ChildSpec], None],
    ) -> None:
        self.settings = settings
        self.roles = tuple(role for role in ROLES if role in roles)
        self.child_main = child_main
        self.status = ProcessStatus(settings.storage.data_dir, settings.node_name)
        self.engine = create_db_engine(settings.database_url, settings.database.busy_timeout_ms)
        self.duties = NodeDuties(
            settings,
            self.engine,
            session_factory(self.engine),
            Spool(settings.storage.data_dir, settings.node_name),
            CrashRecords(settings.storage.data_dir),
            AttemptLimits(settings.worker.max_attempts, settings.worker.max_interruptions),
        )
        processes = settings.processes
        self.children = [
            _Child(role, slot) for role in self.roles for slot in range(processes.count(role))
        ]
        self.listener: socket.socket | None = None
        # the children's end; the supervisor holds the other, never written, until it exits
        self.lifeline, self._lifeline_held = _FORKSERVER.Pipe(duplex=False)
        self.exit_code = 0

    # --- the children ----------------------------------------------------------------------

    def _spawn(self, child: _Child) -> None:
        ready, ready_w = _FORKSERVER.Pipe(duplex=False)
        spec = ChildSpec(
            child.role,
            child.slot,
            self.settings,
            self.listener if child.role == "receive" else None,
            ready_w,
            self.lifeline,
        )
        child.proc = _FORKSERVER.Process(
            target=self.child_main, args=(spec,), name=f"{child.role}-{child.slot}"
        )
        try:
            child.proc.start()
        finally:
            ready_w.close()
        assert child.proc.pid is not None
        child.ready_pipe = ready
        child.started = time.monotonic()
        child.state = replace(child.state, pid=child.proc.pid, running=True, ready=False)
        log.info("started %s-%d (pid %d)", child.role, child.slot, child.proc.pid)

    def _ended(self, child: _Child, code: int) -> int:
        """Clean up after a child that ended (its associations, jobs and deliveries, its
        live metrics); its pid."""
        assert child.proc is not None and child.proc.pid is not None
        pid = child.proc.pid
        child.proc.close()
        child.proc = None
        self._close_ready_pipe(child)
        child.state = replace(
            child.state, pid=None, running=False, ready=False, last_exit=describe_exit(code)
        )
        mark_process_dead(pid, str(self.status.metrics_dir))  # type: ignore[no-untyped-call]
        try:
            self.duties.process_died(f"{self.settings.node_name}:{pid}")
        except Exception:  # the job log may be down: the leases expire and others take over
            log.exception("cannot clean up after process %d in the job log", pid)
        return pid

    def _reap(self, child: _Child, code: int) -> None:
        """Clean up after a child that died and decide when it comes back."""
        pid = self._ended(child, code)
        processes = self.settings.processes
        ran = time.monotonic() - child.started
        child.deaths_in_row = 1 if ran >= processes.restart_max_seconds else child.deaths_in_row + 1
        delay = min(
            processes.restart_seconds * 2 ** (child.deaths_in_row - 1),
            processes.restart_max_seconds,
        )
        child.restart_at = time.monotonic() + delay
        if code == CONFIG_ERROR:
            log.error("%s-%d cannot run with this configuration: stopping", child.role, child.slot)
            self.exit_code = CONFIG_ERROR
            return
        log.error(
            "%s-%d (pid %d) died (%s); restarting in %.1f s",
            child.role,
            child.slot,
            pid,
            describe_exit(code),
            delay,
        )

    @staticmethod
    def _close_ready_pipe(child: _Child) -> None:
        if child.ready_pipe is not None:
            child.ready_pipe.close()
            child.ready_pipe = None

    def _readied(self, child: _Child) -> bool:
        """Whether the child said it is ready since the last look."""
        if child.ready_pipe is None or not child.ready_pipe.poll():
            return False
        try:
            child.ready_pipe.recv_bytes()
        except EOFError:  # it closed the pipe dying
            return False
        finally:
            self._close_ready_pipe(child)
        child.state = replace(child.state, ready=True)
        log.info("%s-%d ready", child.role, child.slot)
        if all(c.state.ready for c in self.children):
            log.info("node %s ready", self.settings.node_name)
        return True

    def _watch(self) -> bool:
        """One look at the children: reap the dead, note the ready, restart the due;
        whether anything changed."""
        changed = False
        for child in self.children:
            if child.proc is not None:
                code = child.proc.exitcode
                if code is not None:
                    self._reap(child, code)
                    changed = True
                elif self._readied(child):
                    changed = True
            elif time.monotonic() >= child.restart_at and self.exit_code == 0:
                if child.state.last_exit:
                    child.state = replace(child.state, restarts=child.state.restarts + 1)
                self._spawn(child)
                changed = True
        return changed

    def _drain(self) -> None:
        """Stop the roles one after another, in the order of the data flow."""
        for role in self.roles:
            group = [c for c in self.children if c.role == role and c.proc is not None]
            for child in group:
                assert child.proc is not None
                child.proc.terminate()
            deadline = time.monotonic() + self.settings.processes.drain_seconds
            for child in group:
                assert child.proc is not None
                child.proc.join(max(deadline - time.monotonic(), 0.1))
                if child.proc.exitcode is None:
                    log.warning("%s-%d did not stop in time: killing it", role, child.slot)
                    child.proc.kill()
                    child.proc.join()
                code = child.proc.exitcode
                assert code is not None
                self._ended(child, code)
                if code not in (0, -signal.SIGTERM):
                    log.warning("%s-%d stopped with %s", role, child.slot, describe_exit(code))
            if role == "receive" and self.listener is not None:
                self.listener.close()
                self.listener = None
            self.status.write([c.state for c in self.children])

    # --- the whole -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> int:
        """Start, supervise until ``stop`` is set (or a child has a configuration error),
        drain; the exit status for ``serve``."""
        shutil.rmtree(self.status.metrics_dir, ignore_errors=True)
        self.status.metrics_dir.mkdir(parents=True)
        self.status.write([c.state for c in self.children])  # none running yet
        # the fork server imports while the job log is migrated; it and so every child
        # inherit the supervisor's environment as it is now
        os.environ[MULTIPROC_ENV] = str(self.status.metrics_dir)
        _FORKSERVER.set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()
        self.duties.start()
        try:
            if "receive" in self.roles:
                dicom = self.settings.dicom
                self.listener = listen(dicom.bind, dicom.port)
            log.info(
                "node %s: DICOM %s@%s:%d, data in %s, processes: %s",
                self.settings.node_name,
                self.settings.dicom.ae_title,
                self.settings.dicom.bind,
                self.settings.dicom.port,
                self.settings.storage.data_dir,
                ", ".join(
                    f"{role} x{sum(c.role == role for c in self.children)}" for role in self.roles
                ),
            )
            self.status.write([c.state for c in self.children])
            while not stop.is_set() and self.exit_code == 0:
                if self._watch():
                    self.status.write([c.state for c in self.children])
                stop.wait(POLL_SECONDS)
            self._drain()
        finally:
            for child in self.children:  # an error above: no orphans
                if child.proc is not None:
                    child.proc.kill()
                    child.proc.join()
            if self.listener is not None:
                self.listener.close()
            self.duties.stop()
            self.engine.dispose()
        return self.exit_code


def become_child(spec: ChildSpec) -> None:
    """In a child: name the process after its role and slot (``ps -o comm`` and ``top`` show
    ``work-0``, Linux) and be killed when the supervisor dies, at once if it is gone already.
    A thread waits on the supervisor's end of ``spec.lifeline``, which only closes when it
    exits, however it does: ``PR_SET_PDEATHSIG`` would follow the fork server instead, which
    outlives the supervisor while any child lives."""
    if sys.platform == "linux":
        pr_set_name = 15
        ctypes.CDLL(None).prctl(pr_set_name, f"{spec.role}-{spec.slot}".encode(), 0, 0, 0)
    threading.Thread(
        target=_die_with_supervisor, args=(spec.lifeline,), name="lifeline", daemon=True
    ).start()


def _die_with_supervisor(lifeline: Connection) -> None:
    with contextlib.suppress(EOFError):
        lifeline.recv_bytes()
    os.kill(os.getpid(), signal.SIGKILL)  # gone with it, as when the host fails


def report_ready(spec: ChildSpec) -> None:
    """In a child: tell the supervisor that its roles have started."""
    spec.ready.send_bytes(b"ready")
    spec.ready.close()
