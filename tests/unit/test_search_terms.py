"""The terms a SearchEpisodes query is reduced to (memsvc.domain._episodes.check_query)."""

from __future__ import annotations

from memsvc.domain._episodes import MAX_QUERY_TERMS, check_query
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


def test_a_query_holds_at_most_64_terms():
    """Found by a review: case forms of one word are apart here and one to SQLite,
    whose ranking cost grows faster than the terms."""
    words = [f"w{index}" for index in range(MAX_QUERY_TERMS + 1)]
    assert len(terms_of(" ".join(words[:-1]))) == MAX_QUERY_TERMS
    violations: list[FieldViolation] = []
    assert check_query(" ".join(words), False, violations) == []
    assert [v.description for v in violations] == [f"has 65 terms, over {MAX_QUERY_TERMS}"]
