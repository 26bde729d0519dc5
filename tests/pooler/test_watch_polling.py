"""tests/contract/test_watch.py through PgBouncer with no direct URL: the tail polls."""

from tests.helpers import reuse

LISTEN = "off"

reuse("tests.contract.test_watch", globals())
