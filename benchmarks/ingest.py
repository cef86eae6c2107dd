"""Ingest throughput: the node versus DCMTK ``storescp``, same data, same sender, same run.

Sends 200 CT-sized instances (512x512, 16 bit, explicit VR little endian) with DCMTK
``storescu`` over one association on loopback, to DCMTK ``storescp`` in its fastest
configuration (bit-preserving, no fsync) and to ``dicom-ai-node serve`` (which fsyncs every
file and commits its row before answering). Prints images per second for both, their ratio
and the node's peak RSS. ``TCP_NODELAY=1`` is set for the DCMTK tools: without it they stall
on delayed ACKs over loopback.

Usage: ``python benchmarks/ingest.py [--count 200] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_ai_node.jobs.db import create_db_engine

ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_instances(folder: Path, count: int) -> list[Path]:
    """``count`` CT images of one series, 512x512 16-bit noise (about 0.5 MB each)."""
    rng = np.random.default_rng(0)
    study, series = generate_uid(), generate_uid()
    paths = []
    template = dcmread(str(get_testdata_file("CT_small.dcm")))
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


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def send(port: int, aet: str, files: list[Path], senders: int) -> float:
    """Seconds for ``senders`` storescu processes at once to send ``files`` (split between
    them), each over one association."""
    # Dirty pages left by an earlier run (storescp does not fsync) would otherwise be
    # flushed by the next run's fsyncs and bill it for the other's writes.
    os.sync()
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", aet, "127.0.0.1", str(port), *map(str, files[n::senders])],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for n in range(senders)
    ]
    if any(proc.wait() != 0 for proc in procs):
        raise RuntimeError("storescu failed")
    return time.perf_counter() - start


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_storescp(files: list[Path], work: Path, repeat: int, senders: int) -> list[float]:
    times = []
    for i in range(repeat):
        out = work / f"storescp-{i}"
        out.mkdir()
        port = free_port()
        fork = ["--fork"] if senders > 1 else []  # one process per association
        proc = subprocess.Popen(
            ["storescp", *fork, "--bit-preserving", "-od", str(out), str(port)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(port)
            times.append(send(port, "STORESCP", files, senders))
        finally:
            proc.terminate()
            proc.wait()
        assert len(list(out.iterdir())) == len(files), "storescp lost files"
        shutil.rmtree(out)
    return times


def run_node(files: list[Path], work: Path, repeat: int, senders: int) -> tuple[list[float], float]:
    times, rss = [], 0.0
    for i in range(repeat):
        data = work / f"node-{i}"
        port = free_port()
        env = {
            **ENV,
            "DICOM_AI_NODE_CONFIG": str(work / "bench.toml"),
            "DICOM_AI_NODE_DICOM__PORT": str(port),
            "DICOM_AI_NODE_HTTP__PORT": "0",
            "DICOM_AI_NODE_STORAGE__DATA_DIR": str(data),
        }
        (work / "bench.toml").write_text(
            '[dicom]\nbind = "127.0.0.1"\n[logging]\nlevel = "WARNING"\n'
            "[assemble]\nstable_seconds = 3600\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_ai_node", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(port)
            times.append(send(port, "AINODE", files, senders))
            rss = max(rss, peak_rss_mb(proc.pid))
        finally:
            proc.terminate()
            proc.wait()
        engine = create_db_engine(f"sqlite:///{data / 'jobs.sqlite'}")
        with engine.connect() as conn:
            stored: int = conn.exec_driver_sql("SELECT count(*) FROM instances").scalar_one()
        engine.dispose()
        assert stored == len(files), f"node recorded {stored} of {len(files)}"
        shutil.rmtree(data)
    return times, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--senders", type=int, default=1, help="storescu processes at once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        work = Path(tmp)
        source = work / "source"
        source.mkdir()
        files = make_instances(source, args.count)
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        dcmtk = run_storescp(files, work, args.repeat, args.senders)
        node, rss = run_node(files, work, args.repeat, args.senders)
    dcmtk_rate = args.count / statistics.median(dcmtk)
    node_rate = args.count / statistics.median(node)
    print(
        f"{args.count} instances, {size_mb:.0f} MB, {args.senders} storescu at once "
        f"(one association each), median of {args.repeat}"
    )
    print(f"DCMTK storescp (bit-preserving, no fsync): {dcmtk_rate:8.1f} images/s")
    print(f"dicom-ai-node (fsync + job log commit):    {node_rate:8.1f} images/s")
    print(f"ratio node / storescp:                     {node_rate / dcmtk_rate:8.2f}")
    print(f"node peak RSS:                             {rss:8.1f} MB")


if __name__ == "__main__":
    main()
