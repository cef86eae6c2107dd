"""The spool shared by several nodes: partial files carry their node's name."""

from __future__ import annotations

from pathlib import Path

from dicom_ai_node.spool import Spool


def test_cleanup_removes_only_its_own_dead_nodes_and_unnamed_partial_files(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, "host-a")
    folder = spool.incoming / "1.2" / "1.2.3"
    folder.mkdir(parents=True)
    hexes = "0123456789abcdef" * 2
    names = {
        owner: folder / f".tmp-{hexes}{'-' + owner if owner else ''}"
        for owner in ("host-a", "host-b", "host-c", "")
    }
    for path in names.values():
        path.write_bytes(b"half")
    assert spool.clean_temporary(dead_nodes=["host-c"]) == 3
    assert [path.exists() for path in names.values()] == [False, True, False, False]


def test_the_job_log_records_paths_relative_to_the_data_folder(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "mount-a")
    path = spool.instance_path("1.2", "1.2.3", "1.2.3.4")
    assert spool.stored(path) == "incoming/1.2/1.2.3/1.2.3.4.dcm"
    elsewhere = Spool(tmp_path / "mount-b")
    assert elsewhere.locate(spool.stored(path)) == tmp_path / "mount-b" / spool.stored(path)
