"""Ingest throughput: the node versus DCMTK and a bare pynetdicom SCP, same data, same run.

Sends CT-sized instances (512x512, 16 bit, explicit VR little endian; 200 by default) with
DCMTK ``storescu`` on loopback, split between 1, 4 and 8 ``storescu`` processes at once (each
its own association), to:

- ``dicom-ai-node serve``, which fsyncs every file and commits its row before answering,
  with one receiver process per core (``[processes] receive``, its default);
- DCMTK ``storescp --fork`` (a process per association, bit-preserving, no fsync): what the
  machine can do;
- for 1 sender, ``benchmarks/bare_scp.py``: pynetdicom writing and fsyncing each file and
  nothing else, the floor our libraries set;
- the floors with as many processes on one socket as the node has receivers (the bare SCP,
  and the "checked" bare SCP that also parses the header and writes atomically, as any
  receiver keeping the node's promises must, but has no job log): how close to each goal
  pynetdicom itself comes on this machine, so that a goal the node misses can be told apart
  from one that these libraries cannot reach here.

Then ingest under inference: a node with the ``head-ct`` route (``head-ct-hemorrhage-demo``)
and one receiver process takes one series with 1 sender while idle, then is sent a 200-slice
head CT and, once that CT's job is running, another series; the share of that ingest
during which a job was running is printed with it. Every server's process tree is sampled
while it runs, and the peak RSS (``VmHWM`` of ``/proc/<pid>/status``) of each process in it
is printed, children included; so is the tree's CPU time per image and how many of the
machine's cores were busy (a case whose cores are all busy is bound by CPU, not by waiting).

The servers of a comparison run at once, and each of ``--repeat`` repeats sends a series of
its own (fresh UIDs) to each of them in turn: on a virtual machine the speed of the same work
drifts by 2x over minutes, so a ratio is taken within a repeat, and the median of the
repeats' ratios is held against the goals of issue 10 (each repeat's printed beside it);
rates are medians. Five repeats by default: four senders' rate over one sender's, sent
alike to the same node, ranged from 1.23 to 1.91 between repeats of one run here.
``TCP_NODELAY=1`` is set for the DCMTK tools: without it they stall on delayed ACKs over
loopback.

Usage: ``.venv/bin/python benchmarks/ingest.py [--count 200] [--repeat 5] [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dicom_ai_node.processes import ProcessStatus  # noqa: E402
from dicom_ai_node.synth import Label, Task, generate_studies  # noqa: E402
from tests.support.helpers import DCMTK_ENV, free_port, wait_for  # noqa: E402

SENDERS = (1, 4, 8)
CORES = os.cpu_count() or 1
GOALS = {"1 sender / bare SCP": 0.9, "4 senders / 1 sender": 1.6, "under inference / idle": 0.8}


def make_series(folder: Path, count: int, seed: int) -> list[Path]:
    """``count`` CT images of one new series, 512x512 16-bit noise (about 0.5 MB each)."""
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    template = dcmread(str(get_testdata_file("CT_small.dcm")))
    paths = []
    for n in range(count):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = n + 1
        ds.Rows = ds.Columns = 512
        ds.PixelData = rng.integers(0, 4096, (512, 512), dtype=np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(port: int, aet: str, files: Sequence[Path], senders: int) -> float:
    """Seconds for ``senders`` storescu processes at once to send ``files`` (split between
    them), each over one association."""
    # Dirty pages left by an earlier run (storescp does not fsync) would otherwise be
    # flushed by the next run's fsyncs and bill it for the other's writes.
    os.sync()
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", aet, "127.0.0.1", str(port), *map(str, files[n::senders])],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for n in range(senders)
    ]
    if any(proc.wait() != 0 for proc in procs):
        raise RuntimeError(f"storescu to {aet} failed")
    return time.perf_counter() - start


# --- peak RSS of a process tree ------------------------------------------------------------


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (children of children included)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after "(comm)"
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _command(pid: int) -> str:
    """A short name for a process: the program, a Python program's arguments, or the name
    a child of ``serve`` gave itself (``work-0``)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    if not argv:
        return "?"
    if "python" in Path(argv[0]).name:
        if "-c" in argv:  # multiprocessing's: serve's fork server, its children, a tracker
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            code = argv[argv.index("-c") + 1]
            if "python" not in comm:  # a child, named after its role
                return comm
            return "fork server" if "forkserver" in code else code.split()[1]
        argv = argv[1:]
        if argv and argv[0].endswith(".py"):
            argv[0] = Path(argv[0]).name
        return " ".join(a for a in argv[:6] if not a.startswith("/") and not a.isdigit())
    return Path(argv[0]).name


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class TreeSampler:
    """Samples the process tree under ``root`` until stopped, keeping each process's peak
    RSS (``VmHWM``): children that come and go (a receiver per association, a restarted
    worker) are caught while they live."""

    root: int
    interval: float = 0.1
    peaks: dict[int, tuple[str, float]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        for pid in _descendants(self.root):
            try:
                command, peak = _command(pid), _peak_mb(pid)
            except OSError:  # ended meanwhile
                continue
            if peak:
                self.peaks[pid] = (command, max(peak, self.peaks.get(pid, ("", 0.0))[1]))

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()

    def summary(self) -> str:
        """One entry per command: how many processes ran it and the largest peak."""
        by_command: dict[str, list[float]] = {}
        for command, peak in self.peaks.values():
            by_command.setdefault(command, []).append(peak)
        return "; ".join(
            f"{command} x{len(peaks)}: max {max(peaks):.0f} MB (sum {sum(peaks):.0f})"
            if len(peaks) > 1
            else f"{command}: {peaks[0]:.0f} MB"
            for command, peaks in by_command.items()
        )


@dataclass
class Server:
    """One server under test, started by :func:`serving`."""

    label: str
    port: int
    aet: str
    sampler: TreeSampler


@contextmanager
def serving(
    label: str,
    command: list[str],
    port: int,
    aet: str,
    env: dict[str, str] | None = None,
    ready: Callable[[], bool] | None = None,
) -> Iterator[Server]:
    """Run ``command`` (a server on ``port``) with its process tree sampled, until exit;
    measured once it listens and ``ready()`` (a node: every process ready, the models
    loaded, so that no start-up work is billed to the first case)."""
    proc = subprocess.Popen(
        command,
        env=env or DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    sampler = TreeSampler(proc.pid)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    try:
        wait_for(
            lambda: proc.poll() is not None or (_listening(port) and (ready is None or ready())),
            timeout=180,
        )
        if proc.poll() is not None:
            raise RuntimeError(f"{label} exited ({proc.returncode}) before listening")
        yield Server(label, port, aet, sampler)
        sampler.sample()
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        sampler.stop()
        thread.join()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- the servers ---------------------------------------------------------------------------


def node_command(
    work: Path, name: str, receivers: int, routes: bool
) -> tuple[list[str], dict[str, str], int]:
    """How to start ``serve`` with its data in ``work/name``: command, environment, port."""
    port = free_port()
    config = work / f"{name}.toml"
    # every sender comes from 127.0.0.1 with one AE title: allow them all at once
    text = (
        '[dicom]\nbind = "127.0.0.1"\nmaximum_associations = 16\n'
        "[dicom.limits]\nmax_associations_per_address = 16\nmax_associations_per_ae = 16\n"
        '[logging]\nlevel = "WARNING"\n[storage]\nmin_free_mb = 0\n'
    )
    if routes:  # the series completes 1 s after its last image; the CT's job then runs
        text += (
            "[assemble]\nstable_seconds = 1\n"
            '[[routes]]\nname = "head-ct"\nmodel = "head-ct-hemorrhage-demo"\n'
            'where = { Modality = ["CT"], BodyPartExamined = ["HEAD"] }\n'
            'outputs = ["sr", "sc", "kos"]\ndestinations = ["outbox"]\n'
        )
    else:  # no route, and no series completes during the run
        text += "[assemble]\nstable_seconds = 3600\n"
    config.write_text(text)
    env = {
        **DCMTK_ENV,
        "PYTHONPATH": str(ROOT),
        "DICOM_AI_NODE_CONFIG": str(config),
        "DICOM_AI_NODE_DICOM__PORT": str(port),
        "DICOM_AI_NODE_HTTP__PORT": "0",
        "DICOM_AI_NODE_STORAGE__DATA_DIR": str(work / name),
        "DICOM_AI_NODE_PROCESSES__RECEIVE": str(receivers),
    }
    return [sys.executable, "-m", "dicom_ai_node", "serve"], env, port


def node_ready(work: Path, name: str) -> Callable[[], bool]:
    """Whether the supervisor of the node in ``work/name`` reports every process ready."""

    def ready() -> bool:
        found = list((work / name / "run").glob("*/processes.json"))
        if len(found) != 1:
            return False
        children = ProcessStatus(work / name, found[0].parent.name).read()
        return bool(children) and all(child.ready for child in children)

    return ready


def stored_instances(work: Path, name: str) -> int:
    """How many instances the node's job log holds."""
    with sqlite3.connect(work / name / "jobs.sqlite") as db:
        return int(db.execute("SELECT count(*) FROM instances").fetchone()[0])


def _tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) used so far by ``root``'s process tree, its ended and reaped
    children included (``cutime``, ``cstime``: fields 14 to 17 of ``/proc/<pid>/stat``)."""
    ticks = 0
    for pid in _descendants(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def _machine_seconds() -> tuple[float, float]:
    """CPU seconds, all cores, that the machine has spent busy (user, nice, system, irq,
    softirq) and that its virtual machine's host has taken (steal), from ``/proc/stat``."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


@dataclass(frozen=True)
class Run:
    """One set of files sent: images per second, the server's CPU time per image, how many
    of the machine's cores were busy on average (senders and all else included) and how
    many the host took from this virtual machine (steal: a noisy neighbour)."""

    rate: float
    cpu_ms_per_image: float
    cores_busy: float
    cores_stolen: float


def measure(server: Server, files: Sequence[Path], senders: int) -> Run:
    """Send ``files`` to ``server`` with ``senders`` storescu processes, measured."""
    root = server.sampler.root
    cpu, (busy, stolen) = _tree_cpu_seconds(root), _machine_seconds()
    seconds = send(server.port, server.aet, files, senders)
    busy_after, stolen_after = _machine_seconds()
    return Run(
        len(files) / seconds,
        1000 * (_tree_cpu_seconds(root) - cpu) / len(files),
        (busy_after - busy) / seconds,
        (stolen_after - stolen) / seconds,
    )


@dataclass
class Results:
    """Every measurement, one :class:`Run` per repeat of each case, in the order taken."""

    runs: dict[tuple[str, int], list[Run]] = field(default_factory=dict)  # (server, senders)
    rss: dict[str, str] = field(default_factory=dict)  # server label -> summary
    coverage: float = 1.0  # least share of an ingest under inference with a job running

    def add(self, server: str, senders: int, run: Run) -> None:
        self.runs.setdefault((server, senders), []).append(run)

    def median(self, server: str, senders: int) -> Run:
        """The median of each figure of the case's repeats."""
        runs = self.runs[server, senders]
        return Run(
            statistics.median(r.rate for r in runs),
            statistics.median(r.cpu_ms_per_image for r in runs),
            statistics.median(r.cores_busy for r in runs),
            statistics.median(r.cores_stolen for r in runs),
        )

    def ratios(self, case: tuple[str, int], against: tuple[str, int]) -> list[float]:
        """``case``'s rate over ``against``'s, repeat by repeat (taken minutes apart at most)."""
        return [a.rate / b.rate for a, b in zip(self.runs[case], self.runs[against], strict=True)]


def run_senders(work: Path, sets: list[dict[int, list[Path]]], results: Results) -> None:
    """1, 4 and 8 senders into the node, into ``storescp --fork`` and into the bare SCPs with
    as many processes as the node has receivers; 1 into the single-process bare SCP.

    The servers run at once and each repeat sends one series to each in turn, so that the
    ratios of a repeat compare moments close together: on a virtual machine the speed of
    the same work drifts by 2x over minutes (other tenants of the host). The node runs as
    ``serve`` does by default, one receiver process per core; each of its cases gets a
    series of its own (fresh UIDs: a series sent again is a different path, the duplicate's),
    which the other servers are sent too.
    """

    def bare(*options: str) -> Callable[[Path, int], list[str]]:
        script = str(ROOT / "benchmarks" / "bare_scp.py")
        return lambda out, port: [sys.executable, script, str(port), str(out), *options]

    servers: dict[str, tuple[str, str, Callable[[Path, int], list[str]]]] = {
        # key: label, AE title, the command for (folder, port)
        "storescp": (
            "storescp --fork",
            "STORESCP",
            lambda out, port: [
                "storescp",
                "--fork",
                "--bit-preserving",
                "-od",
                str(out),
                str(port),
            ],
        ),
        "bare": ("bare pynetdicom SCP", "BARESCP", bare()),
        "bare xN": (
            f"bare pynetdicom SCP, {CORES} processes",
            "BARESCP",
            bare("--processes", str(CORES)),
        ),
        "checked": (
            f"checked bare SCP, {CORES} processes",
            "BARESCP",
            bare("--processes", str(CORES), "--kind", "checked"),
        ),
    }
    node_cmd, env, node_port = node_command(work, "node", CORES, routes=False)
    with contextlib.ExitStack() as stack:
        running: dict[str, Server] = {}
        for key, (label, aet, command) in servers.items():
            out, port = work / key.replace(" ", "-"), free_port()
            out.mkdir()
            running[key] = stack.enter_context(serving(label, command(out, port), port, aet))
        running["node"] = stack.enter_context(
            serving(
                f"node, receive={CORES}",
                node_cmd,
                node_port,
                "AINODE",
                env,
                node_ready(work, "node"),
            )
        )
        for repeat in sets:
            for senders in SENDERS:
                files = repeat[senders]
                for key, server in running.items():
                    if key != "bare" or senders == 1:
                        results.add(key, senders, measure(server, files, senders))
        for server in running.values():
            results.rss[server.label] = server.sampler.summary()
    sent = sum(len(files) for repeat in sets for files in repeat.values())
    if sum(1 for _ in (work / "storescp").iterdir()) != sent:
        raise RuntimeError("storescp lost files")
    if sum(1 for _ in (work / "checked").rglob("*.dcm")) != sent:
        raise RuntimeError("the checked bare SCP lost files")
    if (stored := stored_instances(work, "node")) != sent:
        raise RuntimeError(f"node recorded {stored} of {sent}")
    for key in (*servers, "node"):
        shutil.rmtree(work / key.replace(" ", "-"))


def _job_running(work: Path, name: str) -> bool:
    with sqlite3.connect(work / name / "jobs.sqlite") as db:
        return db.execute("SELECT 1 FROM jobs WHERE state = 'running'").fetchone() is not None


def watching(probe: Callable[[], bool], run: Callable[[], Run]) -> tuple[Run, float]:
    """``run()``'s result, and the share of the samples of ``probe()`` (every 50 ms while it
    ran) that were true."""
    samples: list[bool] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            samples.append(probe())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run()
    finally:
        done.set()
        watcher.join()
    return result, sum(samples) / max(len(samples), 1)


def run_under_inference(
    work: Path, idle: list[list[Path]], busy: list[list[Path]], ct: list[Path], results: Results
) -> None:
    """1 sender into a node with the head CT route: idle, then while the CT is inferred,
    repeat after repeat (each repeat's ratio compares moments close together).

    The CT is sent again before each busy set: a series received again once complete is a
    new generation, so it is inferred again.
    """
    name = "node-infer"
    command, env, port = node_command(work, name, 1, routes=True)
    label = "node under inference, receive=1"
    with serving(label, command, port, "AINODE", env, node_ready(work, name)) as server:
        for idle_files, busy_files in zip(idle, busy, strict=True):
            wait_for(lambda: not _job_running(work, name), timeout=600)
            results.add("idle", 1, measure(server, idle_files, 1))
            send(server.port, server.aet, ct, 1)
            wait_for(lambda: _job_running(work, name), timeout=120)
            run, share = watching(
                lambda: _job_running(work, name),
                functools.partial(measure, server, busy_files, 1),
            )
            results.add("busy", 1, run)
            results.coverage = min(results.coverage, share)
    results.rss[label] = server.sampler.summary()


def _ratio_line(name: str, ratios: Sequence[float], goal: float | None) -> str:
    median = statistics.median(ratios)
    each = " ".join(f"{r:.2f}" for r in ratios)
    line = f"  {name:24} {median:5.2f} ({each})"
    if goal is not None:
        line += f"  goal >= {goal}: {'ok' if median >= goal else 'MISSED'}"
    return line


def report(results: Results, count: int, size_mb: float, repeat: int, slices: int) -> None:
    def rate(server: str, senders: int) -> float:
        return results.median(server, senders).rate

    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(
        f"{count} CT images 512x512x16 per series ({size_mb:.0f} MB), split between the "
        f"senders (storescu, one association each); median of {repeat}; {CORES} cores"
    )
    print(
        f"{'senders':>7} {'receive=':>8} {'node img/s':>11} {'storescp --fork':>16} "
        f"{'node/storescp':>14} {'x 1 sender':>11}"
    )
    for senders in SENDERS:
        node, dcmtk = rate("node", senders), rate("storescp", senders)
        print(
            f"{senders:7d} {CORES:8d} {node:11.1f} {dcmtk:16.1f} "
            f"{node / dcmtk:14.2f} {node / rate('node', 1):11.2f}"
        )
    print(f"bare pynetdicom SCP (write + fsync only), 1 sender: {rate('bare', 1):.1f} img/s")
    print(
        f"the floors with {CORES} processes on one socket, img/s and x 1 sender: bare (write + "
        "fsync) and checked (header parse, atomic write; no job log)"
    )
    for senders in SENDERS:
        floor, checked = rate("bare xN", senders), rate("checked", senders)
        print(
            f"{senders:7d} sender(s): bare {floor:6.1f} x{floor / rate('bare xN', 1):.2f}, "
            f"checked {checked:6.1f} x{checked / rate('checked', 1):.2f}"
        )
    print(
        "CPU: the server's process tree, ms per image; the machine's cores busy meanwhile, "
        "and taken by the host (steal)"
    )
    for server, senders in results.runs:
        run = results.median(server, senders)
        print(
            f"  {server:9} {senders} sender(s): {run.cpu_ms_per_image:5.1f} ms/img, "
            f"{run.cores_busy:.2f} of {CORES} cores busy, {run.cores_stolen:.2f} stolen"
        )
    print(
        f"node with the head-ct route, 1 sender: idle {rate('idle', 1):.1f} img/s, while a "
        f"{slices}-slice CT is inferred {rate('busy', 1):.1f} img/s (a job ran during "
        f"{results.coverage:.0%} of that ingest at least)"
    )
    print("goals (median of the ratios of each repeat; each repeat's in brackets):")
    ratios = {
        "1 sender / bare SCP": results.ratios(("node", 1), ("bare", 1)),
        "4 senders / 1 sender": results.ratios(("node", 4), ("node", 1)),
        "under inference / idle": results.ratios(("busy", 1), ("idle", 1)),
    }
    for name, each in ratios.items():
        print(_ratio_line(name, each, GOALS[name]))
    print(_ratio_line("8 senders / 1 sender", results.ratios(("node", 8), ("node", 1)), None))
    print("the same ratios for the floors (what pynetdicom allows here, with the same processes):")
    floors = {
        "checked / bare, 1 sender": results.ratios(("checked", 1), ("bare", 1)),
        "bare xN, 4 / 1 sender": results.ratios(("bare xN", 4), ("bare xN", 1)),
        "checked, 4 / 1 sender": results.ratios(("checked", 4), ("checked", 1)),
        "node / checked, 1 sender": results.ratios(("node", 1), ("checked", 1)),
        "node / checked, 4 senders": results.ratios(("node", 4), ("checked", 4)),
    }
    for name, each in floors.items():
        print(_ratio_line(name, each, None))
    print("peak RSS (VmHWM) of each process of each server's tree:")
    for label, summary in results.rss.items():
        print(f"  {label}: {summary}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="images per series")
    parser.add_argument("--repeat", type=int, default=5, help="series per case (median)")
    parser.add_argument("--ct-slices", type=int, default=200, help="slices of the inferred CT")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 24 images, 1 series, 24-slice CT"
    )
    args = parser.parse_args()
    if args.quick:
        args.count, args.repeat, args.ct_slices = 24, 1, 24
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        work = Path(tmp)
        seeds = iter(range(args.repeat * (len(SENDERS) + 2)))

        def series() -> list[Path]:
            seed = next(seeds)
            return make_series(work / "source" / f"{seed}", args.count, seed)

        sets = [{senders: series() for senders in SENDERS} for _ in range(args.repeat)]
        idle = [series() for _ in range(args.repeat)]
        busy = [series() for _ in range(args.repeat)]
        (ct_study,) = generate_studies(
            Task.HEAD_CT_HEMORRHAGE,
            Label.POSITIVE,
            1,
            work / "ct",
            0,
            slices=args.ct_slices,
            size=512,
        )
        ct = sorted(ct_study.rglob("*.dcm"))
        size_mb = sum(f.stat().st_size for f in idle[0]) / 1e6
        results = Results()
        run_senders(work, sets, results)
        run_under_inference(work, idle, busy, ct, results)
    report(results, args.count, size_mb, args.repeat, args.ct_slices)


if __name__ == "__main__":
    main()
