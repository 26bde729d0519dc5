"""The terms a SearchEpisodes query is reduced to (memsvc.domain._episodes.check_query)."""

from __future__ import annotations

from memsvc.domain._episodes import check_query
from memsvc.domain._errors import FieldViolation


def terms_of(query: str) -> list[str]:
    violations: list[FieldViolation] = []
    terms = check_query(query, False, violations)
    assert violations == []
    return terms


def test_words_and_quoted_phrases_become_terms():
    assert terms_of('deploy "main.py" fails') == ["deploy", "main py", "fails"]


def test_a_repeated_term_counts_once_in_its_first_place():
    """Found by a review: every term is matched and ranked through its matches, so
    one word 500 times (a valid 999-character query) took SQLite about 50 s over 10
    small episodes, holding one of the few full-text search slots of every project."""
    assert terms_of(" ".join(["x"] * 500)) == ["x"]
    assert terms_of('retry retry "retry" backoff retry') == ["retry", "backoff"]
    # Case forms stay apart: which ones a word matches is the database's to say.
    assert terms_of("Été été Été") == ["Été", "été"]
    assert terms_of('"main py" main.py main py') == ["main py", "main", "py"]
