"""Fuzz tests run on both deployments, like the contract suite (see tests/conftest.py).

Every example uses project ids of its own; the ``projects`` fixture collects them,
and their Redis keys are deleted after the test (``track_project``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import track_project


@pytest.fixture
def projects() -> Iterator[list[str]]:
    """A list the test appends its project ids to; their Redis keys go at the end."""
    used: list[str] = []
    yield used
    for project in used:
        track_project(project)
