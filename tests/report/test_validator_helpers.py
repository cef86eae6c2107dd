"""The validator helpers fail closed: a file they cannot read is a failure, never "no errors"."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.validators import dciodvfy, dcmtk_sr, sr_validator

pytestmark = pytest.mark.peers


@pytest.fixture
def garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"not a DICOM file at all\n" * 10)
    return path


def test_dciodvfy_fails_on_an_unreadable_file(garbage: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="dciodvfy"):
        dciodvfy(garbage)


@pytest.mark.parametrize("tool", ["dsr2html", "dsrdump"])
def test_dcmtk_sr_tools_fail_on_an_unreadable_file(garbage: Path, tool: str) -> None:
    with pytest.raises(pytest.fail.Exception, match=tool):
        dcmtk_sr(tool, garbage)


def test_sr_validator_fails_on_an_unreadable_file(garbage: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="DicomSRValidator"):
        sr_validator([garbage])


def test_dciodvfy_reads_a_real_file() -> None:
    from pydicom.data import get_testdata_file

    findings = dciodvfy(str(get_testdata_file("CT_small.dcm")))
    assert findings.warnings  # CT_small has known warnings: the output was really read
