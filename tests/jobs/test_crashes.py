"""Crash records: a node forgets those of its own dead processes, never another node's."""

from __future__ import annotations

from pathlib import Path

from dicom_ai_node.jobs.crashes import CrashRecords, crash_dir


def test_forget_node_removes_only_that_nodes_records(tmp_path: Path) -> None:
    folder = crash_dir(tmp_path)
    folder.mkdir()
    for name in ("a_1.log", "a_22.log", "a_b_3.log", "ab_4.log", "a_x.log"):
        (folder / name).write_text("Fatal Python error: Aborted")
    records = CrashRecords(tmp_path)
    assert records.forget_node("a") == 2
    assert sorted(p.name for p in folder.iterdir()) == ["a_b_3.log", "a_x.log", "ab_4.log"]
    assert records.of("a_b:3") == "Fatal Python error: Aborted"
