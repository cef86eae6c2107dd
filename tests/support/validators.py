"""The real validators, run so that a check cannot pass by accident.

A validator that is missing, crashes, cannot read the file or prints nothing fails the test:
only a run that demonstrably read and checked the object yields its findings.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.helpers import require

# The XPath limits would stop pixelmed's template stylesheets. The JIT and GC options only
# make a short run cheaper: one file took 9.0 s of CPU (5.2 s wall) with the defaults and
# 4.1 s (3.9 s) with the client compiler and the serial collector, its output the same.
PIXELMED_ENV = {
    "JAVA_TOOL_OPTIONS": "-Djdk.xml.xpathExprOpLimit=0 -Djdk.xml.xpathExprGrpLimit=0 "
    "-Djdk.xml.xpathTotalOpLimit=0 -XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
}

# dciodvfy names the IOD it recognised on a line of its own (e.g. "ComprehensiveSR", "CTImage")
_IOD_LINE = re.compile(r"^[A-Za-z0-9]+$")
# a Java exception's name ("javax.xml...TransformerConfigurationException:") or a stack frame
_JAVA_FAILURE = re.compile(r"^(?:[a-z]\w*\.)+\w*(?:Exception|Error)\b|^\s+at [\w.$<>]+\(", re.M)
_DCIODVFY_UNREAD = ("Dicom dataset read failed", "Information Object Not found", "Abort")


@dataclass(frozen=True)
class Findings:
    """What a validator said of one file: its error and warning lines."""

    errors: list[str]
    warnings: list[str]


def _lines(output: str, prefix: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(prefix)]


def dciodvfy(path: str | Path) -> Findings:
    """dciodvfy (dicom3tools) on ``path``; fails the test unless it identified and read the IOD.

    dciodvfy exits 1 both for a file with errors and for one it could not read, so the exit
    status alone does not tell them apart: the IOD line and the absence of a read failure do.
    """
    run = subprocess.run(
        [require("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60
    )
    output = run.stdout + run.stderr
    errors = _lines(output, "Error")
    if run.returncode not in (0, 1) or (run.returncode == 1 and not errors):
        pytest.fail(f"dciodvfy crashed on {path} (exit {run.returncode}): {output[-2000:]}")
    if any(marker in output for marker in _DCIODVFY_UNREAD) or not any(
        _IOD_LINE.match(line) for line in output.splitlines()
    ):
        pytest.fail(f"dciodvfy did not read {path} as an IOD: {output[-2000:]}")
    return Findings(errors=errors, warnings=_lines(output, "Warning"))


def dciodvfy_errors(path: str | Path) -> list[str]:
    """The "Error" lines dciodvfy prints for a file it read."""
    return dciodvfy(path).errors


def sr_validator(paths: Sequence[str | Path], timeout: float = 180) -> list[Findings]:
    """pixelmed's DicomSRValidator on each path, in parallel (a JVM each, 4 s of CPU).

    It exits 0 even when it throws, so a run counts only with a zero exit status, its
    closing "IOD validation complete" line and no Java exception in its output.
    """
    validator = require("DicomSRValidator")
    env = {**os.environ, **PIXELMED_ENV}
    runs = [
        subprocess.Popen(
            [validator, str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for path in paths
    ]
    findings = []
    try:
        for path, run in zip(paths, runs, strict=True):
            output = run.communicate(timeout=timeout)[0]
            if (
                run.returncode != 0
                or "IOD validation complete" not in output
                or _JAVA_FAILURE.search(output)
            ):
                pytest.fail(f"DicomSRValidator failed on {path} (exit {run.returncode}): {output}")
            findings.append(Findings(_lines(output, "Error"), _lines(output, "Warning")))
    finally:
        for run in runs:
            run.kill()
            run.wait()
    return findings


def dcmtk_sr(tool: str, path: str | Path) -> str:
    """The output of DCMTK's ``dsr2html`` or ``dsrdump`` for an SR; fails unless it read it."""
    run = subprocess.run([require(tool), str(path)], capture_output=True, text=True, timeout=60)
    if run.returncode != 0 or not run.stdout.strip():
        pytest.fail(f"{tool} failed on {path} (exit {run.returncode}): {run.stderr}")
    return run.stdout
