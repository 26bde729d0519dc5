"""Configuration: one table of settings, read from flags and MEMSVC_* variables.

Each setting has a command-line flag and an environment variable; a flag wins
over the variable, which wins over the default. ``SETTINGS`` is the single
source for the parser, the environment loader and the table in
docs/configuration.md (a test keeps that table in sync).

Unknown MEMSVC_* variables are refused, so a typo never silently falls back to
a default, except the ``MEMSVC_PORT*`` and ``MEMSVC_SERVICE_*`` variables that
Kubernetes injects for a Service named ``memsvc``.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from memsvc.domain import WorkingMemoryLimits
from memsvc.failpoints import Failpoints

ENV_PREFIX = "MEMSVC_"
# Variables Kubernetes injects for a Service named "memsvc" (enableServiceLinks).
# Read by the client commands (memsvc.cli_client), not by the server: allowed here,
# so one environment can serve both.
CLIENT_VARIABLES = frozenset(
    {
        "MEMSVC_ADDRESS",
        "MEMSVC_TOKEN_FILE",
        "MEMSVC_TLS_CA",
        "MEMSVC_TLS_CERT",
        "MEMSVC_TLS_KEY",
        "MEMSVC_TLS_SERVER_NAME",
    }
)
_KUBERNETES_INJECTED = re.compile(r"MEMSVC_(PORT(_.*)?|SERVICE_.*)")
# The test suite's own variables (the backends it uses, README): a developer who
# exports them for `make test` can still run `make serve` in the same shell.
_TEST_SUITE_VARIABLES = re.compile(r"MEMSVC_TEST_.*")
# The client variables that look like a server setting's (MEMSVC_TOKEN_FILE for
# MEMSVC_AUTH_TOKENS_FILE): `memsvc serve` ignores them, so a server configured
# with them by mistake serves without tokens or TLS (client_variable_warnings).
# Each with the setting it looks like, and what the server does without that setting.
CLIENT_VARIABLE_FOR_SETTING = {
    "MEMSVC_TOKEN_FILE": ("auth_tokens_file", "asks for no token"),
    "MEMSVC_TLS_CERT": ("tls_cert_file", "serves plaintext"),
    "MEMSVC_TLS_KEY": ("tls_key_file", "serves plaintext"),
    "MEMSVC_TLS_CA": ("tls_client_ca_file", "asks for no client certificate"),
}


class ConfigError(ValueError):
    """A setting has an invalid value or an unknown name."""


class StartupError(Exception):
    """memsvc cannot start, for a reason its message states (an address in use)."""


def listen_is_loopback(listen: str) -> bool:
    """Whether a ``host:port`` to listen on is reachable only from this host."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or a wildcard such as "0.0.0.0" or "::"
        return False


def _default_data_dir(env: Mapping[str, str] = os.environ) -> str:
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "memsvc")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


# Counts reach the stores as 64-bit integers (PostgreSQL's bigint, SQLite's
# INTEGER): past it a setting would start and then fail every call that uses it.
_INT64_MAX = (1 << 63) - 1


def _positive_int(text: str) -> int:
    value = int(text)
    if not 1 <= value <= _INT64_MAX:
        raise ValueError(f"must be from 1 to {_INT64_MAX:,}, got {value:,}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if not 0 <= value <= _INT64_MAX:
        raise ValueError(f"must be from 0 to {_INT64_MAX:,}, got {value:,}")
    return value


def _int_from(low: int, high: int) -> Callable[[str], int]:
    """An integer from ``low`` to ``high``: past them a setting breaks only later,
    at runtime (a date out of range in every sweep, an option gRPC cannot take)."""

    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"must be from {low:,} to {high:,}, got {value:,}")
        return value

    return parse


def _seconds_from(low: float) -> Callable[[str], float]:
    """A positive finite number of seconds, at least ``low`` (a shorter interval
    busy-loops, or times out every probe)."""

    def parse(text: str) -> float:
        value = _positive_float(text)
        if value < low:
            raise ValueError(f"must be at least {low} seconds, got {text!r}")
        return value

    return parse


# An age or time to live: up to 100 years, so that "now minus it" stays a date.
_age_seconds = _int_from(1, 100 * 365 * 86_400)


def _failpoints(text: str) -> str:
    Failpoints(text)  # raises ValueError naming the bad failpoint
    return text


def _positive_float(text: str) -> float:
    value = float(text)
    # Not NaN (asyncio takes it as "due now": every deadline and sleep ends at
    # once) nor infinity (a shutdown that waits for ever).
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a positive finite number, got {text!r}")
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {text!r}")
        return text.lower()

    return parse


@dataclass(frozen=True)
class Setting:
    """One configuration setting: its field, flag, variable, parser and help."""

    name: str
    parse: Callable[[str], Any]
    default: str
    help: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", str, "127.0.0.1:50051", "TCP host:port of the gRPC API. Port 0 picks a free port."),
    Setting("unix_socket", str, "", "Also serve the API on this Unix socket path (empty: no socket); at most 107 bytes on Linux, 103 on macOS (a socket address's length; a longer path is a configuration error)."),
    Setting("unix_socket_group", str, "", "Group of the Unix socket, a name or a gid (empty: memsvc's own group). The socket's mode is 0660, so this group's members may connect."),
    Setting("auth_tokens_file", str, "", "File of bearer tokens, one per line: `TOKEN` or `TOKEN PROJECT_ID[,PROJECT_ID...]` (docs/security.md). When set, every API call needs `authorization: Bearer <token>`. Re-read when it changes. Empty: no tokens."),
    Setting("auth_reload_interval_seconds", _seconds_from(0.05), "5", "How often the tokens file and the TLS files are checked for changes (SIGHUP checks at once; at least 0.05 s)."),
    Setting("tls_cert_file", str, "", "PEM certificate (chain) the API serves TLS with, together with `tls_key_file`; reloaded when it changes. Empty: plaintext."),
    Setting("tls_key_file", str, "", "PEM private key of `tls_cert_file`."),
    Setting("tls_client_ca_file", str, "", "PEM CA certificate(s) for mutual TLS: clients must present a certificate one of them signed. Empty: no client certificate asked."),
    Setting("allow_insecure_remote", _parse_bool, "false", "Start even though `listen` is not a loopback address and neither tokens nor TLS are configured: an open API (docs/security.md)."),
    Setting("health_listen", str, "127.0.0.1:8081", "TCP host:port serving only grpc.health.v1 Check (`liveness`, `readiness`, and the API's health names), for kubelet probes (which need `0.0.0.0:8081`, as the image and the manifests set); empty: none."),
    Setting("metrics_listen", str, "127.0.0.1:9464", "TCP host:port of the Prometheus metrics endpoint (HTTP, `/metrics`; `0.0.0.0:9464` for a scraper elsewhere, as the image and the manifests set); empty: none."),
    Setting("data_dir", str, "$XDG_DATA_HOME/memsvc or ~/.local/share/memsvc", "Directory for the embedded SQLite file."),
    Setting("working_memory_url", str, "memory://", "Working-memory backend: `memory://` (in process; nothing after it), `redis://host:port/db` (`rediss://` for TLS), or a Redis Cluster: `redis+cluster://host:port[,host:port...]` (`rediss+cluster://` for TLS; a pool of `redis_max_connections` per node)."),
    Setting("database_url", str, "sqlite:///<data_dir>/memsvc.db", "Durable store: `sqlite:///path/file.db` or `postgresql://user@host:port/db`."),
    Setting("database_listen_url", str, "", "Where the event tail LISTENs for new events (PostgreSQL): empty, `database_url` itself; a direct URL when `database_url` goes through a transaction pooler such as PgBouncer; `off` to poll only (docs/scaling.md). PostgreSQL only: a URL with a SQLite store is refused (`off` is taken)."),
    Setting("database_prepared_statements", _parse_bool, "true", "Let PostgreSQL keep the plans of memsvc's statements (named prepared statements, after a statement's 5th run on a connection): 20-40% less PostgreSQL CPU per lifecycle call (docs/scaling.md). Turn it off (`--no-database-prepared-statements`) when `database_url` goes through a transaction pooler that does not track prepared statements: PgBouncer before 1.22 (psycopg sends `DEALLOCATE ALL` after a ROLLBACK, which 1.21 passes to a shared server connection), or later without `max_prepared_statements`."),
    Setting("migrate", _parse_bool, "true", "Apply pending schema migrations at start (`--no-migrate` skips them)."),
    Setting("max_value_bytes", _positive_int, "1048576", "Largest value accepted, in bytes of its protobuf encoding."),
    Setting("max_session_keys", _positive_int, "10000", "Most keys one session's working memory may hold."),
    Setting("max_session_bytes", _positive_int, "16777216", "Most bytes (keys plus values) one session's working memory may hold."),
    Setting("max_message_bytes", _int_from(1, 2**31 - 1), "4194304", "Largest gRPC message received or sent (below 2 GiB); responses carry at most 3/4 of it in values."),
    Setting("redis_max_connections", _positive_int, "8", "Size of the Redis connection pool."),
    Setting("database_max_connections", _positive_int, "4", "Size of the PostgreSQL connection pool."),
    Setting("shutdown_grace_seconds", _positive_float, "10", "On SIGTERM/SIGINT, how long in-flight calls may take to finish. A shutdown takes about this plus a few seconds, even while a backend does not answer (docs/reliability.md)."),
    Setting("health_interval_seconds", _seconds_from(0.05), "2", "How often the backends are probed for the health service (at least 0.05 s). Each probe may take this long, or the backend's connect timeout if longer (PostgreSQL 5 s, Redis 2 s): a probe connects again first when its connection was lost."),
    Setting("checkpoint_max_age_seconds", _age_seconds, "604800", "Checkpoints older than this are deleted (7 days; at most 100 years); a paused session's resume checkpoint always stays."),
    Setting("max_checkpoints_per_session", _positive_int, "1000", "Most checkpoints one session may have; Pause and CreateCheckpoint beyond it get RESOURCE_EXHAUSTED (delete some, or let `checkpoint_keep_last` prune them)."),
    Setting("checkpoint_keep_last", _non_negative_int, "0", "Keep at most this many checkpoints per session, newest first (0: no limit)."),
    Setting("request_id_ttl_seconds", _age_seconds, "86400", "How long a request_id is remembered, so a retry returns the first answer (24 hours; at most 100 years)."),
    Setting("retention_interval_seconds", _seconds_from(0.05), "60", "How often expired checkpoints and request ids are deleted (at least 0.05 s)."),
    Setting("event_max_age_seconds", _age_seconds, "604800", "Lifecycle events older than this are compacted away (7 days; at most 100 years); watchers resuming from before get OUT_OF_RANGE."),
    Setting("event_keep_last", _non_negative_int, "0", "Keep at most this many lifecycle events (0: no limit)."),
    Setting("max_watchers", _positive_int, "1000", "Most WatchLifecycle streams one process serves; beyond it, RESOURCE_EXHAUSTED. The API's grpc.health.v1 Watch and reflection streams (which need no token) have a bound of their own, the same number."),
    Setting("max_connection_age_seconds", _int_from(0, 2_147_483), "1800", "A client connection older than this is asked to connect again (an HTTP/2 GOAWAY; gRPC adds up to 10% jitter), and closed 300 s later with whatever still runs on it (a watch reconnects with its cursor): so a client CA or certificate taken out of the TLS files stops being admitted within this plus 5 minutes (docs/security.md). 0: connections live as long as they are used."),
    Setting("max_concurrent_calls", _positive_int, "256", "Most calls (other than watch streams) one process runs at once, each counted until its answer is sent (a client that reads no answers holds them in memory); beyond it, RESOURCE_EXHAUSTED at once instead of a growing queue."),
    Setting("default_deadline_seconds", _positive_float, "30", "Deadline of a call that sets none: past it the call ends with DEADLINE_EXCEEDED and its backend retries stop (watch streams have none)."),
    Setting("event_poll_interval_seconds", _seconds_from(0.05), "1", "How often the event tail polls when no NOTIFY wakes it (at least 0.05 s)."),
    Setting("max_similarity_candidates", _positive_int, "10000", "Most episodes one similarity search compares (in this process); beyond it, FAILED_PRECONDITION."),
    Setting("otel_tracing", _parse_bool, "false", "Trace unary gRPC calls (not streams) with OpenTelemetry, exported over OTLP as the standard `OTEL_EXPORTER_OTLP_*` variables say (needs `memsvc[tracing]`: without it `serve` stops as a configuration error, status 2; the image has no tracing extra)."),
    Setting("failpoints", _failpoints, "", "Test only: failpoints to switch on, `name=crash|error` (see memsvc/failpoints.py)."),
    Setting("log_level", _choice("debug", "info", "warning", "error"), "info", "Lowest level of log records written (debug: memsvc's own; other libraries log at info and above, their debug output carrying stored data)."),
    Setting("log_format", _choice("json", "text"), "json", "`json` (one object per line) or `text`."),
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    """The validated configuration of one memsvc process."""

    def __repr__(self) -> str:
        """Its fields, the URLs without their passwords: a repr ends up in logs and
        in tracebacks that show locals (an ops review)."""
        shown = []
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name.endswith("_url"):
                value = redacted(value)
            shown.append(f"{item.name}={value!r}")
        return f"Config({', '.join(shown)})"

    listen: str = "127.0.0.1:50051"
    unix_socket: str = ""
    unix_socket_group: str = ""
    auth_tokens_file: str = ""
    auth_reload_interval_seconds: float = 5.0
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    allow_insecure_remote: bool = False
    health_listen: str = "127.0.0.1:8081"
    metrics_listen: str = "127.0.0.1:9464"
    data_dir: str = field(default_factory=_default_data_dir)
    working_memory_url: str = "memory://"
    database_url: str = ""
    database_listen_url: str = ""
    database_prepared_statements: bool = True
    migrate: bool = True
    max_value_bytes: int = 1 << 20
    max_session_keys: int = 10_000
    max_session_bytes: int = 16 << 20
    max_message_bytes: int = 4 << 20
    redis_max_connections: int = 8
    database_max_connections: int = 4
    shutdown_grace_seconds: float = 10.0
    health_interval_seconds: float = 2.0
    checkpoint_max_age_seconds: int = 7 * 24 * 3600
    max_checkpoints_per_session: int = 1000
    checkpoint_keep_last: int = 0
    request_id_ttl_seconds: int = 24 * 3600
    retention_interval_seconds: float = 60.0
    event_max_age_seconds: int = 7 * 24 * 3600
    event_keep_last: int = 0
    max_watchers: int = 1000
    max_connection_age_seconds: int = 1800
    max_concurrent_calls: int = 256
    default_deadline_seconds: float = 30.0
    event_poll_interval_seconds: float = 1.0
    max_similarity_candidates: int = 10_000
    otel_tracing: bool = False
    failpoints: str = ""
    log_level: str = "info"
    log_format: str = "json"

    def __post_init__(self) -> None:
        if not self.database_url:
            url = "sqlite:///" + str(
                Path(self.data_dir).expanduser().resolve() / "memsvc.db"
            ).lstrip("/")
            object.__setattr__(self, "database_url", url)
        _check_address("listen", self.listen)
        # An empty host (":9464") means every IPv4 interface (bind_address).
        if self.health_listen:
            _check_address("health_listen", self.health_listen, empty_host=True)
        if self.metrics_listen:
            _check_address("metrics_listen", self.metrics_listen, empty_host=True)
        if not self.working_memory_url.startswith(
            ("memory://", "redis://", "rediss://", "unix://", "redis+cluster://",
             "rediss+cluster://")
        ):  # fmt: skip
            raise ConfigError(
                "working_memory_url must start with memory://, redis://, rediss://, unix://, "
                f"redis+cluster:// or rediss+cluster://, got {redacted(self.working_memory_url)!r}"
            )
        if self.working_memory_url.startswith("memory://") and self.working_memory_url != (
            "memory://"
        ):
            # Nothing after it is read: a host or option there was meant for another URL.
            raise ConfigError(
                "working_memory_url memory:// takes nothing after it (in-process working "
                f"memory), got {redacted(self.working_memory_url)!r}"
            )
        if self.database_listen_url not in ("", "off") and not self.database_listen_url.startswith(
            ("postgresql://", "postgres://")
        ):
            raise ConfigError(
                "database_listen_url must be empty, `off` or a postgresql:// URL, got "
                f"{redacted(self.database_listen_url)!r}"
            )
        if not self.database_url.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ConfigError(
                f"database_url must start with sqlite://, postgresql:// or postgres://, got "
                f"{redacted(self.database_url)!r}"
            )
        for name in ("database_url", "database_listen_url", "working_memory_url"):
            url = getattr(self, name)
            if not url.startswith("sqlite:") and _BAD_ESCAPE.search(url):
                # Caught here: the drivers' own errors quote the text around the
                # '%', which is usually the password, and retry it for seconds.
                raise ConfigError(
                    f"{name} has a '%' that does not start a percent-encoded byte: in a user "
                    f"name or password, write '%' as %25 (and '@', ':', '/' as %40, %3A, "
                    f"%2F); got {redacted(url)!r}"
                )
            if not url.startswith("sqlite:") and _reserved_in_userinfo(url):
                # The drivers would read part of the password as the host or port and
                # quote it in their errors, logged at every retry.
                raise ConfigError(
                    f"{name} has a '/', '?' or '#' in its user name or password: write them "
                    f"percent-encoded (%2F, %3F, %23); got {redacted(url)!r}"
                )
            if url.startswith("postgres") and _authority(url).count("@") > 1:
                # libpq ends the password at the first '@' (redis-py, as urllib, at the
                # last): it would read the rest of the password as the host, and quote
                # it in the error it logs at every retry.
                raise ConfigError(
                    f"{name} has an '@' in its user name or password: write it "
                    f"percent-encoded, as %40; got {redacted(url)!r}"
                )
            if url.startswith(("redis", "postgres")) and (problem := _host_problem(url)):
                # Else the driver fails at start with a traceback (and the URL in it).
                raise ConfigError(f"{name} {problem}; got {redacted(url)!r}")
        self._check_store_urls()
        if self.database_url.startswith("sqlite://") and self.database_listen_url not in (
            "",
            "off",
        ):
            # A SQLite store's events need no LISTEN: the URL was meant for a
            # PostgreSQL database_url that is not set.
            raise ConfigError(
                "database_listen_url is for a PostgreSQL database_url; this one is SQLite"
                f" ({redacted(self.database_url)!r})"
            )
        try:
            self.working_memory_limits()
        except ValueError as error:
            raise ConfigError(str(error)) from error
        self._check_security()

    def _check_store_urls(self) -> None:
        """What the stores' drivers would refuse only at start, with a traceback, or
        never (a Redis database that is not a number would be database 0)."""
        # Here, not at the top: the stores import this module.
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        from memsvc.store.redis import RedisWorkingMemoryStore
        from memsvc.store.sqlite import sqlite_path

        url = self.working_memory_url
        if not url.startswith("memory:") and (problem := RedisWorkingMemoryStore.url_problem(url)):
            raise ConfigError(f"working_memory_url {problem}; got {redacted(url)!r}")
        if self.database_url.startswith("sqlite:"):
            try:
                sqlite_path(self.database_url)
            except ValueError as error:
                raise ConfigError(f"database_url: {error}") from error
        for name in ("database_url", "database_listen_url"):
            url = getattr(self, name)
            if url.startswith("postgres"):
                try:
                    conninfo_to_dict(url)
                except psycopg.ProgrammingError as error:
                    raise ConfigError(
                        f"{name}: {_libpq_complaint(error)}; got {redacted(url)!r}"
                    ) from error

    def _check_security(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError(
                "tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file too"
            )
        if self.unix_socket_group and not self.unix_socket:
            raise ConfigError("unix_socket_group is set but unix_socket is not")
        if (
            not listen_is_loopback(self.listen)
            and not self.auth_tokens_file
            and not self.tls_cert_file
            and not self.allow_insecure_remote
        ):
            raise ConfigError(
                f"listen {self.listen!r} is not a loopback address, and neither "
                "auth_tokens_file nor tls_cert_file is set: anyone who reaches it could read "
                "and change every agent's memory. Set --auth-tokens-file "
                "(MEMSVC_AUTH_TOKENS_FILE) and/or --tls-cert-file with --tls-key-file, or pass "
                "--allow-insecure-remote (MEMSVC_ALLOW_INSECURE_REMOTE=true) to accept an open "
                "API (docs/security.md)"
            )

    @property
    def response_budget_bytes(self) -> int:
        """Bytes of values one response may carry: 3/4 of the message limit."""
        return self.max_message_bytes * 3 // 4

    def working_memory_limits(self) -> WorkingMemoryLimits:
        """The working-memory limits these settings give (ValueError when inconsistent)."""
        return WorkingMemoryLimits(
            max_value_bytes=self.max_value_bytes,
            max_session_keys=self.max_session_keys,
            max_session_bytes=self.max_session_bytes,
            response_budget_bytes=self.response_budget_bytes,
            message_bytes=self.max_message_bytes,
        )


def load(
    argv_values: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Build the configuration from parsed flags (None: not given) and environment."""
    env = os.environ if env is None else env
    given = {k: v for k, v in (argv_values or {}).items() if v is not None}
    known = {s.env for s in SETTINGS} | CLIENT_VARIABLES
    unknown = sorted(
        name
        for name in env
        if name.startswith(ENV_PREFIX)
        and name not in known
        and not _KUBERNETES_INJECTED.fullmatch(name)
        and not _TEST_SUITE_VARIABLES.fullmatch(name)
    )
    if unknown:
        raise ConfigError(
            f"unknown environment variable(s) {', '.join(unknown)}; see docs/configuration.md"
        )
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.name in given:
            values[setting.name] = given[setting.name]
        elif setting.env in env:
            try:
                values[setting.name] = setting.parse(env[setting.env])
            except ValueError as error:
                raise ConfigError(f"{setting.env}: {error}") from error
    values.setdefault("data_dir", _default_data_dir(env))
    try:
        return Config(**values)
    except TypeError as error:  # pragma: no cover - SETTINGS and Config out of sync
        raise ConfigError(str(error)) from error


def client_variable_warnings(config: Config, env: Mapping[str, str]) -> list[str]:
    """Warnings for `memsvc serve`: a client variable is set whose server setting is
    not (a typo that would serve without tokens or TLS). Not an error: a container
    may set the client variables for the memsvc commands it runs against the server."""
    by_name = {setting.name: setting for setting in SETTINGS}
    warnings: list[str] = []
    for variable, (name, without_it) in CLIENT_VARIABLE_FOR_SETTING.items():
        if env.get(variable) and not getattr(config, name):
            setting = by_name[name]
            warnings.append(
                f"{variable} is set, but memsvc serve does not read it: it is a variable of "
                f"the client commands (docs/cli.md). The server's is {setting.env} "
                f"({setting.flag}), which is not set: the API {without_it}. Ignore this if "
                f"{variable} is meant for memsvc commands run in this environment."
            )
    return warnings


# A '%' not followed by two hex digits: no URL decoder takes it.
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _reserved_in_userinfo(url: str) -> bool:
    """Whether the user name or password holds an unencoded '/', '?' or '#': the
    authority then ends inside it, and its '@' comes after that character ("u:s/3cret@db"
    reads as host "u", port "s"). An '@' in a query value ("?user=app@server") is no
    sign of it."""
    rest = url.partition("://")[2]
    cut = min((index for index in (rest.find(c) for c in "/?#") if index >= 0), default=len(rest))
    head, tail = rest[:cut], rest[cut:]
    if "@" in head or "@" not in tail:
        return False  # the credentials end before the authority does, or there are none
    return "=" not in tail[: tail.index("@")]


def _authority(url: str) -> str:
    """The user name, password and hosts of a URL: what follows the scheme, up to the
    first '/', '?' or '#'."""
    return re.split(r"[/?#]", url.partition("://")[2], maxsplit=1)[0]


def _host_problem(url: str) -> str | None:
    """What is wrong with the hosts of a Redis or PostgreSQL URL (one or several,
    comma-separated, as both drivers take them), or None. The user name and
    password hold no '/', '?' or '#' (checked before), and in a PostgreSQL URL no
    '@' either; in a Redis URL an '@' may stay unencoded, as redis-py reads the
    hosts after the last one."""
    for host in _authority(url).rpartition("@")[2].split(","):
        if host.startswith("[") and "]" not in host:
            return f"has an IPv6 address without its closing ']' ({host!r})"
        port = host.rpartition("]")[2] if host.startswith("[") else host
        port = port.rpartition(":")[2] if ":" in port else ""
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            return f"has a port that is not a number from 1 to 65535 ({port!r})"
    return None


# libpq's URL errors that quote only an option's name: any other may quote a
# password (an unencoded space, a bad or %00 escape) or the whole URL.
_LIBPQ_ERRORS_WITHOUT_SECRETS = re.compile(
    r'(invalid|extra key/value separator "=" in) URI query parameter: "\w+"'
)


def _libpq_complaint(error: Exception) -> str:
    """What to say of a URL that libpq cannot parse: its own words only when they
    cannot quote a secret."""
    text = str(error).strip()
    if _LIBPQ_ERRORS_WITHOUT_SECRETS.fullmatch(text):
        return text
    return (
        "libpq cannot parse it: look for a space (write it as %20), a %00 (which no "
        "value may hold), or a character after an IPv6 address's ']' other than ':' or '/'"
    )


def redacted(url: str) -> str:
    """``url`` without its password, for messages: whatever follows the user name
    up to the last '@' (a password that is not percent-encoded may hold '@', ':',
    '/' or '?'), and any ``*password=`` parameter."""
    scheme, separator, rest = url.partition("://")
    if separator:
        # The last '@' of the whole rest: a password may hold '?' or '/' as well
        # (leaving out too much of a malformed URL is harmless).
        userinfo, at, after = rest.rpartition("@")
        if at and ":" in userinfo:
            rest = f"{userinfo.split(':', 1)[0]}:***@{after}"
        url = f"{scheme}://{rest}"
    return re.sub(r"(password=)[^&]*", r"\1***", url, flags=re.IGNORECASE)


def bind_address(address: str) -> str:
    """The address to bind for ``address``: an empty host (``:9464``, allowed for
    the probes and metrics) is every IPv4 interface, which neither gRPC nor the
    HTTP server would take as it is."""
    return "0.0.0.0" + address if address.startswith(":") else address


def _check_address(name: str, address: str, empty_host: bool = False) -> None:
    """A TCP host:port to listen on; port 0 picks a free one."""
    found = re.fullmatch(r"(.*):(\d+)" if empty_host else r"(.+):(\d+)", address)
    if found is None or int(found[2]) > 65535:
        raise ConfigError(f"{name} must be host:port with a port from 0 to 65535, got {address!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; every default is None so the env can fill it."""

    def flag_type(setting: Setting) -> Callable[[str], Any]:
        def parse(text: str) -> Any:
            try:
                return setting.parse(text)
            except ValueError as error:
                raise argparse.ArgumentTypeError(str(error)) from error

        return parse

    for setting in SETTINGS:
        help_text = f"{setting.help} [env {setting.env}, default {setting.default}]"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help strings
        if setting.parse is _parse_bool:
            parser.add_argument(
                setting.flag, dest=setting.name, action=argparse.BooleanOptionalAction,
                default=None, help=help_text,
            )  # fmt: skip
        else:
            parser.add_argument(
                setting.flag, dest=setting.name, type=flag_type(setting), default=None,
                help=help_text, metavar=setting.name.upper(),
            )  # fmt: skip


def markdown_table() -> str:
    """The settings as the Markdown table in docs/configuration.md."""
    lines = ["| Flag | Environment variable | Default | Meaning |", "|---|---|---|---|"]
    for setting in SETTINGS:
        flag = f"`{setting.flag}`" + (
            f" / `--no-{setting.flag[2:]}`" if setting.parse is _parse_bool else ""
        )
        lines.append(f"| {flag} | `{setting.env}` | `{setting.default}` | {setting.help} |")
    return "\n".join(lines) + "\n"


def _check_in_sync() -> None:
    names = {f.name for f in fields(Config)}
    setting_names = {s.name for s in SETTINGS}
    if names != setting_names:  # pragma: no cover - caught by the unit tests
        raise AssertionError(f"Config and SETTINGS differ: {names ^ setting_names}")


_check_in_sync()
