"""tests/contract/test_watch.py through PgBouncer, the tail LISTENing on a direct URL."""

from tests.helpers import reuse

reuse("tests.contract.test_watch", globals())
