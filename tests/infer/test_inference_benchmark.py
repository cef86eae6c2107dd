"""benchmarks/inference.py runs end to end on its smallest settings (a smoke run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_quick_run_prints_every_path():
    args = ["--quick", "--images", "4", "--sizes", "32", "--naive-images", "2"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "inference.py"), *args],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=900,
    ).stdout
    assert "head-ct-hemorrhage-demo (128x128), batch 16" in out
    assert "naive model.predict per image (2 images)" in out
    for backend in ("tensorflow", "onnx"):
        assert f"densenet121 32x32, {backend}: batch 16" in out
    tables = out.split("densenet121 32x32, ")[1:]
    for table, paths in zip(tables, (4, 3), strict=True):  # ONNX: no maps for every image
        rows = [line for line in table.splitlines() if line.startswith(("raw", "end to end"))]
        assert len(rows) == paths, table
        assert all(float(row.split()[-1]) > 0 for row in rows)  # the repeat's ratio
