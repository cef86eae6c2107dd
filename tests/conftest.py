"""Shared fixtures: settings in a temporary folder and nodes running in-process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_ai_node.config import Settings
from dicom_ai_node.node import Node
from tests.helpers import make_settings


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Settings]:
    return lambda **overrides: make_settings(tmp_path, **overrides)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start in-process nodes (stopped at teardown)."""
    nodes: list[Node] = []

    def start(models: dict[str, Any] | None = None, **overrides: Any) -> Node:
        node = Node(make_settings(tmp_path, **overrides), models=models if models else {})
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()
