"""Configuration: flags over environment over defaults; unknown names refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from memsvc.config import (
    SETTINGS,
    Config,
    ConfigError,
    client_variable_warnings,
    load,
    markdown_table,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_defaults_are_the_embedded_deployment():
    config = load({}, {"XDG_DATA_HOME": "/srv/data"})
    assert config.listen == "127.0.0.1:50051"
    # Every listener on loopback without settings (docs/security.md).
    assert config.health_listen == "127.0.0.1:8081"
    assert config.metrics_listen == "127.0.0.1:9464"
    assert config.working_memory_url == "memory://"
    assert config.database_url == "sqlite:///srv/data/memsvc/memsvc.db"
    assert config.migrate is True
    assert config.response_budget_bytes == 3 << 20


def test_environment_is_read_and_flags_win():
    env = {"MEMSVC_LISTEN": "0.0.0.0:7000", "MEMSVC_MAX_SESSION_KEYS": "50", "MEMSVC_MIGRATE": "no"}
    config = load({"listen": "127.0.0.1:9000", "max_session_keys": None}, env)
    assert config.listen == "127.0.0.1:9000"
    assert config.max_session_keys == 50
    assert config.migrate is False


def test_unknown_variables_are_refused_but_kubernetes_service_links_ignored():
    with pytest.raises(ConfigError, match="MEMSVC_LISTN"):
        load({}, {"MEMSVC_LISTN": "x"})
    injected = {
        "MEMSVC_PORT": "tcp://10.0.0.1:50051",
        "MEMSVC_PORT_50051_TCP_ADDR": "10.0.0.1",
        "MEMSVC_SERVICE_HOST": "10.0.0.1",
        "MEMSVC_SERVICE_PORT": "50051",
    }
    assert load({}, injected).listen == "127.0.0.1:50051"


def test_the_test_suites_variables_are_ignored():
    """README: the tests take their backends from MEMSVC_TEST_*; exported for
    `make test`, they must not stop `make serve` in the same shell."""
    env = {
        "MEMSVC_TEST_REDIS_URL": "redis://127.0.0.1:6379/0",
        "MEMSVC_TEST_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/test",
        "MEMSVC_TEST_POSTGRES_BIN": "/usr/lib/postgresql/15/bin",
    }
    config = load({}, env)
    assert config.working_memory_url == load({}, {}).working_memory_url
    with pytest.raises(ConfigError, match="MEMSVC_TESTS_REDIS_URL"):
        load({}, {"MEMSVC_TESTS_REDIS_URL": "redis://127.0.0.1:6379/0"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MEMSVC_MAX_VALUE_BYTES": "-1"}, "from 1 to"),
        ({"MEMSVC_LOG_FORMAT": "xml"}, "must be one of"),
        ({"MEMSVC_MIGRATE": "maybe"}, "true or false"),
        ({"MEMSVC_LISTEN": "no-port"}, "host:port"),
        ({"MEMSVC_LISTEN": "127.0.0.1:99999"}, "listen must be host:port with a port from 0"),
        ({"MEMSVC_HEALTH_LISTEN": "foo"}, "health_listen must be host:port"),
        ({"MEMSVC_METRICS_LISTEN": "127.0.0.1"}, "metrics_listen must be host:port"),
        ({"MEMSVC_DATABASE_URL": "mysql://x"}, "database_url"),
        ({"MEMSVC_MAX_VALUE_BYTES": "4000000"}, "3/4 of max_message_bytes"),
        ({"MEMSVC_DEFAULT_DEADLINE_SECONDS": "nan"}, "positive finite"),
        ({"MEMSVC_SHUTDOWN_GRACE_SECONDS": "inf"}, "positive finite"),
        ({"MEMSVC_HEALTH_INTERVAL_SECONDS": "0"}, "positive finite"),
        # Past these, a setting broke only at runtime: every probe timed out at once,
        # every sweep failed on a date out of range, gRPC could not take the option.
        ({"MEMSVC_HEALTH_INTERVAL_SECONDS": "0.000001"}, "at least 0.05 seconds"),
        ({"MEMSVC_RETENTION_INTERVAL_SECONDS": "0.0001"}, "at least 0.05 seconds"),
        # Or busy-looped: the reload checking the files, the tail polling the database.
        ({"MEMSVC_AUTH_RELOAD_INTERVAL_SECONDS": "1e-9"}, "at least 0.05 seconds"),
        ({"MEMSVC_EVENT_POLL_INTERVAL_SECONDS": "0.001"}, "at least 0.05 seconds"),
        ({"MEMSVC_EVENT_MAX_AGE_SECONDS": "100000000000"}, "from 1 to 3,153,600,000"),
        ({"MEMSVC_CHECKPOINT_MAX_AGE_SECONDS": "100000000000"}, "from 1 to"),
        ({"MEMSVC_REQUEST_ID_TTL_SECONDS": "0"}, "from 1 to"),
        ({"MEMSVC_MAX_MESSAGE_BYTES": str(2**31)}, "from 1 to 2,147,483,647"),
        # Found by a review: past 64 bits, every checkpoint (or vector search) then
        # failed with INTERNAL, the stores' integers being 64-bit.
        ({"MEMSVC_CHECKPOINT_KEEP_LAST": str(2**63)}, "from 0 to 9,223,372,036,854,775,807"),
        ({"MEMSVC_MAX_SIMILARITY_CANDIDATES": str(2**63)}, "from 1 to 9,223"),
        # Past these the server started on database 0, or failed with a traceback.
        ({"MEMSVC_WORKING_MEMORY_URL": "redis://127.0.0.1:6379/abc"}, "database number"),
        ({"MEMSVC_WORKING_MEMORY_URL": "redis://h:6379/0?socket_timeout=x"}, "socket_timeout"),
        ({"MEMSVC_WORKING_MEMORY_URL": "redis://h:6379/0?fast=yes"}, "'fast'"),
        ({"MEMSVC_WORKING_MEMORY_URL": "redis+cluster://h:7000?fast=yes"}, "'fast'"),
        ({"MEMSVC_DATABASE_URL": "sqlite://"}, "not a SQLite URL"),
        ({"MEMSVC_WORKING_MEMORY_URL": "memory://redis-host:6379"}, "takes nothing after it"),
        ({"MEMSVC_DATABASE_URL": "postgresql://h/db?fast=yes"}, 'parameter: "fast"'),
        ({"MEMSVC_DATABASE_LISTEN_URL": "postgresql://h/db?fast=yes"}, "database_listen_url"),
        ({"MEMSVC_DATABASE_LISTEN_URL": "postgresql://h/db"}, "is for a PostgreSQL database_url"),
    ],
)
def test_bad_values_are_refused_with_the_setting_named(env, message):
    with pytest.raises(ConfigError, match=message):
        load({}, env)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        # A scheme typo: the message quotes the URL, not its password.
        ({"MEMSVC_DATABASE_URL": "postgresq://u:s3cretpw@h/db"}, "'postgresq://u:\\*\\*\\*@h/db'"),
        # An unencoded '%': the driver's error would quote the password, again and again.
        (
            {"MEMSVC_DATABASE_URL": "postgresql://memsvc:my%Secret5Pw@127.0.0.1:5432/x"},
            "write '%' as %25",
        ),
        (
            {"MEMSVC_DATABASE_LISTEN_URL": "postgresql://h/db?password=s3cret%"},
            "password=\\*\\*\\*",
        ),
        ({"MEMSVC_WORKING_MEMORY_URL": "redis://:s3cret%zz@h:6379/0"}, "redis://:\\*\\*\\*@h"),
        ({"MEMSVC_WORKING_MEMORY_URL": "redis://:s3cret?zz%@h:6379/0"}, "redis://:\\*\\*\\*@h"),
    ],
)
def test_a_bad_url_is_refused_without_its_password(env, message):
    with pytest.raises(ConfigError, match=message) as refused:
        load({}, env)
    assert "s3cret" not in str(refused.value) and "Secret5Pw" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:s3cret/x%zz@h/db",  # a '/' in the password
        "postgresql://u:s3cret@x%zz@h/db",  # an '@' in the password
        "postgresql://u:s3cret?x%zz@h/db",  # a '?' in the password
        "postgresql://h/db?sslpassword=s3cret%zz",
    ],
)
def test_passwords_with_reserved_characters_are_left_out_too(url):
    with pytest.raises(ConfigError, match="%25") as refused:
        load({}, {"MEMSVC_DATABASE_URL": url})
    assert "s3cret" not in str(refused.value) and "zz" not in str(refused.value)


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("MEMSVC_WORKING_MEMORY_URL", "redis://:pa/s3cret@h:6379/0"),  # read as port 'pa'
        ("MEMSVC_DATABASE_URL", "postgresql://memsvc:s3/cret@db/x"),  # read as port 's3'
        ("MEMSVC_DATABASE_URL", "postgresql://memsvc:s#3cret@db/x"),
        ("MEMSVC_DATABASE_LISTEN_URL", "postgresql://memsvc:s?3cret@db/x"),
        ("MEMSVC_DATABASE_URL", "postgresql://memsvc:2024/s3cret@db/x"),  # a valid "port"
        ("MEMSVC_DATABASE_URL", "postgresql://memsvc:/s3cret@db/x"),  # an empty one
        ("MEMSVC_DATABASE_URL", "postgresql://mem/svc:s3cret@db/x"),  # in the user name
        ("MEMSVC_DATABASE_URL", "postgresql://memsvc:a,b/s3cret@db/x"),  # "several hosts"
    ],
)
def test_an_unencoded_slash_question_mark_or_hash_in_a_password_is_refused(name, url):
    """A driver would read part of the password as the port, and quote it in an
    error logged at every retry."""
    with pytest.raises(ConfigError, match="%2F, %3F, %23") as refused:
        load({}, {name: url})
    assert "3cret" not in str(refused.value) and "pa/" not in str(refused.value)


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("MEMSVC_DATABASE_URL", "postgresql://memsvc:Tr0ub4dor@Horse-Battery@127.0.0.1:5432/x"),
        ("MEMSVC_DATABASE_LISTEN_URL", "postgresql://memsvc:Tr0ub4dor@Horse-Battery@db/x?a=b"),
        ("MEMSVC_DATABASE_URL", "postgres://app@corp:Tr0ub4dor@db/x"),  # in the user name
    ],
)
def test_an_unencoded_at_in_a_postgresql_password_is_refused(name, url):
    """Found by a review: libpq ends the password at the first '@' and took
    "Horse-Battery@127.0.0.1" for the host, which memsvc logged at every retry
    before it exited 1; memsvc's checks had split at the last '@' and passed it."""
    with pytest.raises(ConfigError, match="as %40") as refused:
        load({}, {name: url})
    assert "Tr0ub4dor" not in str(refused.value) and "Horse" not in str(refused.value)


def test_an_unencoded_at_in_a_redis_password_is_taken_whole():
    """redis-py (as urllib) ends the password at the last '@': no reason to refuse."""
    from redis.asyncio.connection import parse_url

    url = "redis://:Tr0ub4dor@Horse-Battery@127.0.0.1:6379/0"
    assert load({}, {"MEMSVC_WORKING_MEMORY_URL": url}).working_memory_url == url
    assert parse_url(url)["password"] == "Tr0ub4dor@Horse-Battery"


@pytest.mark.parametrize(
    ("name", "url", "says"),
    [
        # A cluster URL without nodes: the cluster parser's own message quoted the URL.
        ("MEMSVC_WORKING_MEMORY_URL", "redis+cluster://:S3cretPW@", "at least one node"),
        ("MEMSVC_WORKING_MEMORY_URL", "redis+cluster://user:S3cretPW@/0", "at least one node"),
        ("MEMSVC_WORKING_MEMORY_URL", "rediss+cluster://:S3cretPW@,", "at least one node"),
        # libpq's parse errors quote the token they choke on: here the password.
        ("MEMSVC_DATABASE_URL", "postgresql://u:S3cretPW x@host/db", "a space"),
        ("MEMSVC_DATABASE_URL", "postgresql://u:p@host/db?password=S3cretPW x", "a space"),
        ("MEMSVC_DATABASE_LISTEN_URL", "postgresql://u:S3cretPW%00@host/db", "%00"),
        ("MEMSVC_DATABASE_URL", "postgresql://u:S3cretPW@[::1]x/db", "IPv6"),
    ],
)
def test_configuration_errors_never_quote_a_password(name, url, says):
    """Found by a review: these messages quoted the password (the cluster parser's
    copy of the URL, libpq's `unexpected spaces found in "S3cretPW x"`)."""
    with pytest.raises(ConfigError, match=says) as refused:
        load({}, {name: url})
    assert "S3cretPW" not in str(refused.value)
    assert "***" in str(refused.value)  # the URL is still quoted, redacted


def test_percent_encoded_passwords_and_sqlite_paths_are_accepted():
    url = "postgresql://memsvc:my%25Secret%40%2F%3F%23@127.0.0.1:5432/x?sslmode=disable"
    assert load({}, {"MEMSVC_DATABASE_URL": url}).database_url == url
    cluster = "redis+cluster://:pw@h1:7000,h2:7001/0"
    assert load({}, {"MEMSVC_WORKING_MEMORY_URL": cluster}).working_memory_url == cluster
    # An '@' in a query leaves the user name and password whole.
    for url in (
        "postgresql:///memsvc?host=/var/run/postgresql&user=memsvc@EXAMPLE.COM",
        "postgresql://h.example.com/db?user=app@h",
        "postgresql://u:p@[::1]:5432/db",
        "postgresql://u:p[ss@h/db",  # brackets are no reserved character here
        "postgresql://h/db?application_name=memsvc@pod-1",
    ):
        assert load({}, {"MEMSVC_DATABASE_URL": url}).database_url == url
    unix = "unix:///run/redis.sock?password=p@ss"
    assert load({}, {"MEMSVC_WORKING_MEMORY_URL": unix}).working_memory_url == unix
    assert load({}, {"MEMSVC_DATABASE_URL": "sqlite:///tmp/100%done.db"}).database_url


def test_client_variables_set_for_the_server_are_warned_of():
    """Found by a review: MEMSVC_TOKEN_FILE and MEMSVC_TLS_* (the client commands'
    names) were taken by `memsvc serve` and ignored, so a typo served plaintext
    without tokens, silently. A warning, not a refusal: a container may set them for
    the memsvc commands it runs."""
    env = {
        "MEMSVC_TOKEN_FILE": "/run/token",
        "MEMSVC_TLS_CERT": "/run/tls.crt",
        "MEMSVC_TLS_KEY": "/run/tls.key",
        "MEMSVC_TLS_CA": "/run/ca.crt",
        "MEMSVC_ADDRESS": "127.0.0.1:50051",  # no server counterpart
    }
    warnings = client_variable_warnings(load({}, env), env)
    assert len(warnings) == 4
    for client, server in (
        ("MEMSVC_TOKEN_FILE", "MEMSVC_AUTH_TOKENS_FILE"),
        ("MEMSVC_TLS_CERT", "MEMSVC_TLS_CERT_FILE"),
        ("MEMSVC_TLS_KEY", "MEMSVC_TLS_KEY_FILE"),
        ("MEMSVC_TLS_CA", "MEMSVC_TLS_CLIENT_CA_FILE"),
    ):
        assert any(w.startswith(f"{client} is set") and server in w for w in warnings)
    # With the server's own setting (a flag here) too, the client variable is no typo.
    served = load({"auth_tokens_file": "/run/tokens"}, env)
    assert not any("MEMSVC_TOKEN_FILE" in w for w in client_variable_warnings(served, env))
    assert client_variable_warnings(load({}, {}), {}) == []


def test_probe_and_metrics_addresses_may_leave_the_host_empty():
    config = load({"metrics_listen": ":9464", "health_listen": ":8081"}, {})
    assert (config.metrics_listen, config.health_listen) == (":9464", ":8081")
    with pytest.raises(ConfigError, match="listen must be host:port"):
        load({"listen": ":50051"}, {})


def test_docs_table_matches_the_settings():
    """docs/configuration.md embeds `memsvc config` output; regenerate it when settings change."""
    assert markdown_table() in DOCS.read_text(), "run `memsvc config` and paste it into the docs"


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_help_lists_every_setting(command, capsys):
    """`memsvc serve --help` once crashed on a '%' in a setting's help text."""
    from memsvc.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for setting in SETTINGS:
        assert setting.flag in shown


def test_tracing_without_its_extra_is_a_startup_error(monkeypatch):
    """--otel-tracing where the tracing extra is not installed (the image installs
    only the server extra) says what to install, as a start-up failure does."""
    from memsvc import tracing
    from memsvc.config import StartupError

    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # import fails
    with pytest.raises(StartupError, match=r"pip install 'memsvc\[tracing\]'"):
        tracing.make_tracer_provider()


def test_serve_with_tracing_but_not_its_extra_is_refused_before_any_backend(
    tmp_path, monkeypatch, capsys
):
    """Found by a review of the image (which installs only the server extra): such a
    sidecar applied its migrations, opened its stores, then exited with status 1."""
    from memsvc.cli import EXIT_USAGE, main

    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # import fails
    monkeypatch.setenv("MEMSVC_OTEL_TRACING", "true")
    data_dir = tmp_path / "data"
    args = ["--data-dir", str(data_dir), "--listen", "127.0.0.1:0"]
    assert main(["serve", *args, "--health-listen=", "--metrics-listen="]) == EXIT_USAGE
    assert "configuration error: otel_tracing needs the tracing extra" in capsys.readouterr().err
    assert not data_dir.exists()


async def test_a_server_with_tracing_but_not_its_extra_opens_nothing(tmp_path, monkeypatch):
    """The same refusal where a program makes the Server itself: before the stores."""
    from memsvc.server import Server
    from memsvc.tracing import TracingUnavailable

    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    data_dir = tmp_path / "data"
    settings = {"MEMSVC_DATA_DIR": str(data_dir), "MEMSVC_OTEL_TRACING": "true"}
    config = load({}, {**settings, "MEMSVC_LISTEN": "127.0.0.1:0"})
    with pytest.raises(TracingUnavailable):
        await Server(config).start()
    assert not data_dir.exists()


@pytest.mark.parametrize(
    ("name", "url", "says"),
    [
        ("MEMSVC_WORKING_MEMORY_URL", "redis://:R3disPW@127.0.0.1:notaport/0", "port"),
        ("MEMSVC_WORKING_MEMORY_URL", "redis://:R3disPW@[::1/0", "closing"),
        ("MEMSVC_DATABASE_URL", "postgresql://u:R3disPW@db:70000/x", "port"),
        ("MEMSVC_DATABASE_URL", "postgresql://u:R3disPW@db1:5432,db2:x/x", "port"),
    ],
)
def test_a_url_with_a_bad_host_or_port_is_a_configuration_error(name, url, says):
    """Found by a review: memsvc started, and failed with a traceback (exit 1)."""
    with pytest.raises(ConfigError, match=says) as refused:
        load({}, {name: url})
    assert "R3disPW" not in str(refused.value)


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("MEMSVC_DATABASE_URL", "postgresql://u:pw@db1:5432,db2:5433/x"),
        ("MEMSVC_WORKING_MEMORY_URL", "redis+cluster://a:7000,b:7001,[::1]:7002"),
        ("MEMSVC_WORKING_MEMORY_URL", "redis://[::1]/0"),
        ("MEMSVC_WORKING_MEMORY_URL", "unix:///run/redis.sock"),
        # Found by a review: memsvc's own RESP2 collided with the URL's choice.
        ("MEMSVC_WORKING_MEMORY_URL", "redis+cluster://a:7000?protocol=2"),
        ("MEMSVC_WORKING_MEMORY_URL", "redis+cluster://a:7000?protocol=3"),
        ("MEMSVC_WORKING_MEMORY_URL", "redis://a:6379/0?protocol=3"),
    ],
)
def test_urls_with_several_hosts_or_none_are_taken(name, url):
    assert getattr(load({}, {name: url}), name.removeprefix("MEMSVC_").lower()) == url


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({}, "memsvc"),
        ({"OTEL_SERVICE_NAME": "agent-42-memsvc"}, "agent-42-memsvc"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=pod-7,team=ai"}, "pod-7"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "team.service.name=x"}, "memsvc"),
    ],
)
def test_traces_name_the_service_the_environment_names(monkeypatch, env, name):
    """Found by a review: OTEL_SERVICE_NAME, which the tracing docs mention, lost to
    memsvc's own name."""
    from memsvc import tracing

    for variable in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(variable, raising=False)
    for variable, text in env.items():
        monkeypatch.setenv(variable, text)
    provider = tracing.make_tracer_provider()
    try:
        assert provider.resource.attributes["service.name"] == name
    finally:
        provider.shutdown()


def test_a_config_s_repr_leaves_out_the_urls_passwords():
    """Found by an ops review: the dataclass repr showed database_url's password, and a
    repr ends up in logs and in tracebacks that show locals."""
    config = Config(
        database_url="postgresql://memsvc:pg-secret@db:5432/memsvc",
        working_memory_url="redis://:redis-secret@redis:6379/0",
    )
    shown = repr(config)
    assert "pg-secret" not in shown and "redis-secret" not in shown
    assert "db:5432/memsvc" in shown and "max_session_keys=10000" in shown
