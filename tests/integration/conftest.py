"""Fixtures shared by the integration tests (the broker fixtures live in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fl_processes import Procs


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Real processes with logs under tmp_path/logs; whatever is still running at the end is stopped."""
    p = Procs(tmp_path / "logs")
    yield p
    p.stop_all()
