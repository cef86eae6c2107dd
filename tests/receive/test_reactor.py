"""The association reactor waits on its socket: an idle association does not poll, a busy
one is answered as before, and a stop tells the two apart."""

from __future__ import annotations

import copy
import operator
import threading
import time
from collections.abc import Callable

from pynetdicom import AE
from pynetdicom.association import Association as DicomAssociation
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from dicom_ai_node.jobs.models import Association
from dicom_ai_node.node import Node
from dicom_ai_node.receive.reactor import MAX_WAIT_SECONDS, ContextTemplates, ReactiveDUL
from dicom_ai_node.receive.scp import IDLE_AT_STOP_SECONDS
from tests.support.helpers import instance, wait_for

IDLE_SECONDS = 1.0
GRACE_SECONDS = 60.0


def _associate(node: Node) -> DicomAssociation:
    """An association from a modality (CT1) proposing Verification and CT Image Storage."""
    ae = AE(ae_title="CT1")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", node.scp.port, ae_title="AINODE")


def test_an_association_gets_its_own_contexts_holding_the_same_uids(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory()
    templates = node.scp._server.contexts
    assert isinstance(templates, ContextTemplates)
    # what pynetdicom's request handler gives each association it makes
    own = copy.deepcopy(templates)
    assert len(own) == len(templates) > 100  # every storage SOP class, and more
    for mine, template in zip(own, templates, strict=True):
        # its own objects, which it may change without changing the next association's
        assert mine is not template
        assert mine.transfer_syntax is not template.transfer_syntax
        assert (mine.abstract_syntax, mine.transfer_syntax) == (
            template.abstract_syntax,
            template.transfer_syntax,
        )
        assert (mine.scu_role, mine.scp_role) == (template.scu_role, template.scp_role)
        # and not one UID rebuilt (a deep copy validates every UID again: 48 ms)
        assert mine.abstract_syntax is template.abstract_syntax
        assert all(map(operator.is_, mine.transfer_syntax, template.transfer_syntax))
    assoc = _associate(node)
    try:
        assert assoc.is_established
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [
            Verification,
            CTImageStorage,
        ]
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_an_idle_association_waits_instead_of_polling(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    assoc = _associate(node)
    assert assoc.is_established
    try:
        accepted = wait_for(lambda: node.scp.ae.active_associations)
        dul = accepted[0].dul
        assert isinstance(dul, ReactiveDUL)
        waits = 0
        lock = threading.Lock()
        wait = dul._wait

        def counted() -> None:
            nonlocal waits
            with lock:
                waits += 1
            wait()

        dul._wait = counted  # type: ignore[method-assign]
        time.sleep(IDLE_SECONDS)
        with lock:
            idle_waits = waits
        # pynetdicom's own loop looks at the socket every _run_loop_delay (1 ms by default):
        # about a thousand times in that second; this one only when its wait times out
        assert idle_waits <= 2 * IDLE_SECONDS / MAX_WAIT_SECONDS + 5, idle_waits
        # and it still answers at once, and more than once
        for _ in range(3):
            assert assoc.send_c_echo().Status == 0x0000
            assert assoc.send_c_store(instance()).Status == 0x0000
    finally:
        assoc.release()
    assert assoc.is_released
    wait_for(lambda: not node.scp.ae.active_associations)
    assert not dul.is_alive()


def test_a_stop_lets_a_sending_association_finish_and_aborts_an_idle_one(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory()
    idle, busy = _associate(node), _associate(node)
    assert idle.is_established and busy.is_established
    statuses: list[int] = []
    stopping = threading.Event()

    def send() -> None:
        """Store without a pause until well after the idle one is given up, then release."""
        stopping.wait()
        until = time.monotonic() + IDLE_AT_STOP_SECONDS + 1.0
        while time.monotonic() < until:
            statuses.append(int(busy.send_c_store(instance()).Status))
        busy.release()

    sender = threading.Thread(target=send)
    sender.start()
    stopping.set()
    started = time.monotonic()
    node.scp.stop(grace_seconds=GRACE_SECONDS)
    stopped_after = time.monotonic() - started
    sender.join(timeout=60)
    # it waited for the sending one, not for the idle one (which would take the grace)
    assert IDLE_AT_STOP_SECONDS < stopped_after < GRACE_SECONDS / 2, stopped_after
    assert busy.is_released  # it ended as its requestor chose, not by the stop
    assert statuses and set(statuses) == {0x0000}
    wait_for(lambda: idle.is_aborted, timeout=10)
    with node.sessions() as session:
        outcomes = dict(session.execute(select(Association.instances, Association.outcome)).all())
    assert outcomes == {len(statuses): "released", 0: "aborted"}


def test_a_stop_waits_for_a_store_that_waits_for_the_job_log(
    node_factory: Callable[..., Node],
) -> None:
    """A C-STORE held up in its handler (the job log's write lock taken) is not idle: the
    stop waits for it and it is answered with success."""
    node = node_factory()
    assoc = _associate(node)
    assert assoc.is_established
    statuses: list[int] = []
    stopper = threading.Thread(target=node.scp.stop, kwargs={"grace_seconds": GRACE_SECONDS})
    with node.engine.connect() as holder:
        lock = holder.begin()  # BEGIN IMMEDIATE: holds the write lock
        sender = threading.Thread(
            target=lambda: statuses.append(int(assoc.send_c_store(instance()).Status))
        )
        sender.start()
        wait_for(lambda: node.scp.ingest.recorder._leading)  # the handler waits for the lock
        stopper.start()
        time.sleep(IDLE_AT_STOP_SECONDS + 1.0)  # longer than an idle association is kept
        assert assoc.is_established and stopper.is_alive()
        lock.rollback()
    sender.join(timeout=60)
    assert statuses == [0x0000]
    assoc.release()
    stopper.join(timeout=60)
    assert assoc.is_released and not stopper.is_alive()
