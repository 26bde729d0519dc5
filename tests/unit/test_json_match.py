"""The metadata filter rule shared by SQLite's SQL function and the LangGraph saver's
check of a checkpoint read by id: PostgreSQL's jsonb equality, key by key."""

from __future__ import annotations

import pytest

from memsvc._json_match import json_holds


@pytest.mark.parametrize(
    ("document", "wanted", "held"),
    [
        ('{"k": 1}', '{"k": 1.0}', True),  # numbers by value
        ('{"k": 1}', '{"k": true}', False),  # true is not 1
        ('{"k": 0.30000000000000004}', '{"k": 0.3}', False),  # exactly
        ('{"k": 18446744073709551616}', '{"k": 18446744073709551616}', True),
        ('{"k": {"a": 1, "b": 2}}', '{"k": {"b": 2, "a": 1}}', True),  # key order
        ('{"k": {"a": 1, "b": 2}}', '{"k": {"a": 1}}', False),  # equal, not contained
        ("{}", '{"k": null}', False),  # a key asked for must be there
        ('{"k": null}', '{"k": null}', True),
        ('{"k": NaN}', '{"k": NaN}', False),  # no JSON value equals NaN
        ('{"k": Infinity}', '{"k": Infinity}', False),
        ("[1]", "{}", False),  # not an object
    ],
)
def test_a_filter_holds_as_postgresql_compares_it(document: str, wanted: str, held: bool):
    assert json_holds(document, wanted) is held
