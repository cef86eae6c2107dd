"""Where the C-STORE ack path spends its time: per-phase timing of the store handler.

Runs a node in this process (the SCP and its handler, as ``serve`` builds them) and sends it
``--count`` CT images (512x512x16) with DCMTK ``storescu`` (``--senders`` at once, each its own
association). Each phase of the handler that runs before the C-STORE response (PS3.7 9.1.1)
is wrapped with a timer: building the Part 10 stream from the received bytes, the header
parse, the free-space check, the spool write and its fsyncs, the job log transaction (its
statements, then begin and commit, and the wait for a shared transaction: see
``GroupCommit``), the audit tally and the metrics. The table gives each
phase's time per store and its share of the wall time (with several senders the handlers
overlap, so shares may add up to more than 100%); what is left of the wall time is
pynetdicom's own work (reading the PDUs, decoding the command set) and the sender's.
``--cprofile`` also prints the handler's hottest functions (1 sender only: cProfile follows
the thread that enabled it).

``--floor ROUNDS`` then asks how close to the bare pynetdicom SCP (``bare_scp.py``, write and
fsync only) the node could come if the job log cost nothing: each round sends a fresh series
from one storescu to the node, to the node with its job-log transaction skipped (a what-if
made here by replacing ``GroupCommit.record``, never a setting: the file is written, its row
is not) and to the bare SCP, one after another, and prints each one's rate and ratio to the
bare SCP's. What the what-if keeps is what the node must do before answering: parse the
header (the UIDs that file the instance and the statuses of PS3.4 B.2.3) and write the file
atomically (temporary file, fsync, rename, fsync of the folder).

Usage: ``.venv/bin/python benchmarks/ack_path.py [--count 300] [--senders 1] [--cprofile]
[--floor 3]``
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import logging
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pynetdicom.events import Event
from sqlalchemy import Connection, Engine

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dicom_ai_node.receive.ingest as ingest_module  # noqa: E402
import dicom_ai_node.receive.record as record_module  # noqa: E402
import dicom_ai_node.spool as spool_module  # noqa: E402
from benchmarks.ingest import make_series, send, serving  # noqa: E402
from dicom_ai_node.audit.messages import ReceivedTally  # noqa: E402
from dicom_ai_node.metrics import NodeMetrics  # noqa: E402
from dicom_ai_node.node import Node  # noqa: E402
from dicom_ai_node.receive.ingest import Ingest  # noqa: E402
from dicom_ai_node.receive.record import GroupCommit, Recorded  # noqa: E402
from dicom_ai_node.receive.scp import StorageSCP  # noqa: E402
from dicom_ai_node.spool import Spool  # noqa: E402
from tests.support.helpers import free_port, make_settings  # noqa: E402

# (phase, what it is), in the order of the handler; nested phases are indented
PHASES = (
    ("handler", "StorageSCP._on_store, all of it"),
    ("  encoded_dataset", "pynetdicom builds the Part 10 stream (preamble, meta, data set)"),
    ("  ingest.store", "Ingest.store, all of it"),
    ("    read_header", "pydicom parses the header (stop before pixels)"),
    ("    space_left", "free-space floor check"),
    ("    spool.write", "temporary file, write, fsync, rename, fsync of the folder"),
    ("      fsync", "os.fsync calls (file and folder)"),
    ("      fsync folder", "of which the folder's (_fsync_dir)"),
    ("    group commit", "GroupCommit.record: until a committed transaction holds it"),
    ("      db transaction", "BEGIN IMMEDIATE .. COMMIT, one per batch of instances"),
    ("        record_instance", "of which the statements (upserts of study, series, instance)"),
    ("  audit tally", "ReceivedTally.add"),
    ("  metrics", "NodeMetrics.instance_received"),
)


class Phases:
    """Time spent in wrapped callables, summed over all threads."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.profile: cProfile.Profile | None = None
        #: The ``--floor`` what-if: ``GroupCommit.record`` returns without a transaction.
        self.skip_row = False

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.seconds[phase] += seconds
            self.calls[phase] += 1

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        """Replace ``owner.name`` by a timed call of it."""
        original: Callable[..., Any] = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.timing(phase):
                return original(*args, **kwargs)

        setattr(owner, name, timed)


class TimedEngine:
    """The ingest's engine, its ``begin()`` timed as the job log transaction."""

    def __init__(self, engine: Engine, phases: Phases) -> None:
        self._engine, self._phases = engine, phases

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        with self._phases.timing("      db transaction"), self._engine.begin() as connection:
            yield connection


def instrument(phases: Phases) -> None:
    """Wrap each phase of the ack path (before the node is built, so it uses the wrappers)."""
    on_store = StorageSCP._on_store

    def handler(self: StorageSCP, event: Event) -> Any:
        profile = phases.profile
        if profile is not None:
            profile.enable()
        try:
            with phases.timing("handler"):
                return on_store(self, event)
        finally:
            if profile is not None:
                profile.disable()

    StorageSCP._on_store = handler  # type: ignore[method-assign]
    phases.wrap(Event, "encoded_dataset", "  encoded_dataset")
    phases.wrap(Ingest, "store", "  ingest.store")
    phases.wrap(ingest_module, "read_header", "    read_header")
    phases.wrap(Ingest, "space_left", "    space_left")
    phases.wrap(Spool, "write", "    spool.write")
    phases.wrap(os, "fsync", "      fsync")
    phases.wrap(spool_module, "_fsync_dir", "      fsync folder")
    record = GroupCommit.record

    def record_or_skip(self: GroupCommit, *args: Any) -> Recorded:
        if phases.skip_row:
            return Recorded(duplicate=False, old_path=None, generation=0)
        return record(self, *args)

    GroupCommit.record = record_or_skip  # type: ignore[method-assign,assignment]
    phases.wrap(GroupCommit, "record", "    group commit")
    phases.wrap(record_module, "record_instance", "        record_instance")
    phases.wrap(ReceivedTally, "add", "  audit tally")
    phases.wrap(NodeMetrics, "instance_received", "  metrics")


#: The cases of ``--floor``, in the order of a round.
FLOOR_CASES = ("node", "node without its job-log row (what-if)", "bare pynetdicom SCP")


def measure_floor(
    node: Node, aet: str, work: Path, count: int, rounds: int, phases: Phases
) -> list[dict[str, float]]:
    """Images/s of each of :data:`FLOOR_CASES` per round, one sender each (see ``--floor``)."""
    bare_out = work / "bare"
    bare_out.mkdir()
    port = free_port()
    command = [sys.executable, str(ROOT / "benchmarks" / "bare_scp.py"), str(port), str(bare_out)]
    results = []
    with serving("bare pynetdicom SCP", command, port, "BARESCP") as bare:
        for n in range(rounds):
            rates = {}
            for case in FLOOR_CASES:
                files = make_series(work / f"floor-{n}-{FLOOR_CASES.index(case)}", count, n + 1)
                phases.skip_row = case != FLOOR_CASES[0]
                server = (bare.port, bare.aet) if case == FLOOR_CASES[2] else (node.scp.port, aet)
                rates[case] = count / send(*server, files, 1)
            phases.skip_row = False
            results.append(rates)
    return results


def print_floor(rounds: list[dict[str, float]], count: int) -> None:
    """The ``--floor`` table: each case's images/s per round and its ratio to the bare SCP."""
    print(f"\n--floor: {count} images from 1 storescu per case, {len(rounds)} rounds")
    print(f"{'case':42} {'img/s per round':>24}  ratio to bare per round (median)")
    bare = [r[FLOOR_CASES[2]] for r in rounds]
    for case in FLOOR_CASES:
        rates = [r[case] for r in rounds]
        ratios = [rate / floor for rate, floor in zip(rates, bare, strict=True)]
        print(
            f"{case:42} {' '.join(f'{rate:7.1f}' for rate in rates):>24}  "
            f"{' '.join(f'{ratio:.2f}' for ratio in ratios)} ({statistics.median(ratios):.2f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="images sent")
    parser.add_argument("--senders", type=int, default=1, help="storescu processes at once")
    parser.add_argument("--cprofile", action="store_true", help="profile the handler (1 sender)")
    parser.add_argument("--floor", type=int, default=0, metavar="ROUNDS", help="see above")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    phases = Phases()
    instrument(phases)
    with tempfile.TemporaryDirectory(prefix="ack-path-") as tmp:
        work = Path(tmp)
        files = make_series(work / "source", args.count, 0)
        size_mb = files[0].stat().st_size / 1e6
        settings = make_settings(
            work,
            dicom={
                "bind": "127.0.0.1",
                "port": 0,
                "limits": {"max_associations_per_address": 16, "max_associations_per_ae": 16},
            },
            assemble={"stable_seconds": 3600},
        )
        node = Node(settings)
        recorder = node.scp.ingest.recorder
        recorder.engine = TimedEngine(recorder.engine, phases)  # type: ignore[assignment]
        node.start()
        try:
            send(node.scp.port, settings.dicom.ae_title, files[:5], 1)  # warm up
            phases.seconds.clear()
            phases.calls.clear()
            if args.cprofile:
                phases.profile = cProfile.Profile()
            wall = send(node.scp.port, settings.dicom.ae_title, files[5:], args.senders)
            profile, phases.profile = phases.profile, None
            seconds, calls = dict(phases.seconds), dict(phases.calls)
            floor = (
                measure_floor(node, settings.dicom.ae_title, work, args.count, args.floor, phases)
                if args.floor
                else []
            )
        finally:
            node.stop()
    stores = calls["handler"]
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(
        f"{stores} C-STORE of 512x512x16 CT images ({size_mb:.2f} MB) "
        f"from {args.senders} storescu at once: {stores / wall:.1f} images/s, "
        f"{wall / stores * 1e3:.2f} ms of wall time per image"
    )
    print(f"{'phase':22} {'ms/store':>9} {'calls/store':>11} {'% of wall':>9}  what")
    for phase, what in PHASES:
        spent = seconds.get(phase, 0.0)
        print(
            f"{phase:22} {spent / stores * 1e3:9.3f} {calls.get(phase, 0) / stores:11.2f} "
            f"{spent / wall:9.1%}  {what}"
        )
    if profile is not None:
        stats = pstats.Stats(profile)
        stats.sort_stats("tottime").print_stats(15)
    if floor:
        print_floor(floor, args.count)


if __name__ == "__main__":
    main()
