"""Error messages that an operator reads."""

from __future__ import annotations

from memsvc.domain import BackendUnavailable


def test_an_unavailable_backend_names_its_cause_even_without_text():
    """A bare TimeoutError has no text: the message does not end in a dangling colon."""
    bare = BackendUnavailable("durable store (PostgreSQL)", TimeoutError())
    assert str(bare) == (
        "the durable store (PostgreSQL) backend is unavailable: TimeoutError; retry later"
    )
    refused = BackendUnavailable("working memory", ConnectionRefusedError("refused"))
    assert "ConnectionRefusedError: refused; retry later" in str(refused)
