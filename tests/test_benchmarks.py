"""The benchmarks still run: ``benchmarks/ingest.py --quick`` against real DCMTK peers."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support.helpers import ROOT, require


@pytest.mark.slow  # about a minute: four node processes, one of them loading a model
@pytest.mark.peers
def test_ingest_benchmark_quick() -> None:
    require("storescu")
    require("storescp")
    result = subprocess.run(
        [sys.executable, "benchmarks/ingest.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for senders in (1, 4, 8):  # senders, receivers, node and storescp rates, ratios
        assert re.search(rf"^\s+{senders}\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.M), (
            out
        )
    for goal in ("1 sender / bare SCP", "4 senders / 1 sender", "under inference / idle"):
        assert re.search(rf"{goal}\s+[\d.]+ \([\d. ]+\)\s+goal >= [\d.]+: (ok|MISSED)", out), out
    for senders in (1, 4, 8):  # the floors with as many processes as the node's receivers
        assert re.search(
            rf"^\s+{senders} sender\(s\): bare\s+[\d.]+ x[\d.]+, checked\s+[\d.]+ x[\d.]+$",
            out,
            re.M,
        ), out
    for floor in ("checked / bare, 1 sender", "bare xN, 4 / 1 sender", "checked, 4 / 1 sender"):
        assert re.search(rf"{floor}\s+[\d.]+ \([\d. ]+\)$", out, re.M), out
    assert re.search(r"node under inference.*serve: \d+ MB", out), out
    assert re.search(r"node\s+4 sender\(s\):\s+[\d.]+ ms/img, [\d.]+ of \d+ cores busy", out), out
