"""Terminate's context summary renders only the values its 1,000 characters show,
and is exactly the prefix of the whole state rendered as sorted JSON."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from memsvc.domain._lifecycle import state_summary
from memsvc.domain._session_memory import SnapshotEntry

JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def entries_of(state: dict[str, Any]) -> list[SnapshotEntry]:
    return [SnapshotEntry(key, json.dumps(value).encode(), None) for key, value in state.items()]


@settings(max_examples=300)
@given(st.dictionaries(st.text(max_size=12), JSON, max_size=30), st.integers(0, 400))
def test_the_summary_is_the_prefix_of_the_whole_state(state, limit):
    whole = json.dumps(state, sort_keys=True, default=str, ensure_ascii=False)
    assert state_summary(entries_of(state), json.loads, limit) == whole[:limit]


def test_only_the_values_shown_are_rendered():
    state = {f"key-{i:05d}": {"payload": "x" * 180, "i": i} for i in range(10_000)}
    rendered: list[bytes] = []

    def render(stored: bytes) -> Any:
        rendered.append(stored)
        return json.loads(stored)

    summary = state_summary(entries_of(state), render, 1000)
    assert summary == json.dumps(state, sort_keys=True)[:1000]
    assert len(rendered) <= 6, f"{len(rendered)} values rendered for a 1,000-character prefix"


def test_text_outside_ascii_stays_searchable_and_control_characters_are_escaped():
    """Found by a review: escaped as \\u00fc, "Müller" could not be found by a search,
    and each character took six of the summary's 1,000."""
    state = {"notizen": "Lösung für Müller", "メモ": "東京で会議", "raw": "a\x00b\x01"}
    summary = state_summary(entries_of(state), json.loads, 1000)
    assert "Müller" in summary and "メモ" in summary and "東京で会議" in summary
    assert "\\u0000" in summary and "\x00" not in summary
    assert json.loads(summary) == state


def test_an_empty_state_is_an_empty_object():
    assert state_summary([], json.loads, 1000) == "{}"
