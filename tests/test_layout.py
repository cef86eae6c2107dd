"""The pipeline's direction: nothing below ``web/`` imports it (only the wiring does)."""

from __future__ import annotations

import ast

from tests.support.helpers import ROOT

WIRING = {"node.py", "cli.py", "demo.py"}


def test_only_the_wiring_imports_web() -> None:
    package = ROOT / "dicom_ai_node"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        if relative.parts[0] == "web" or str(relative) in WIRING:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(name.startswith("dicom_ai_node.web") for name in names):
                offenders.append(str(relative))
    assert offenders == []
