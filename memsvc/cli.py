"""The ``memsvc`` command: ``serve``, ``migrate`` and ``config`` run the service;
the operator commands (``sessions``, ``spawn``, ``get``, ``watch``...) talk to a
running one (memsvc.cli_client, docs/cli.md).

Exit codes of the service commands: 0 success, 1 runtime failure (for example a
database that never answered), 2 bad usage or configuration. The operator
commands add codes by status (docs/cli.md).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Sequence

import memsvc._quiet_grpc  # noqa: F401 (before grpc is imported)
from memsvc import __version__, cli_client
from memsvc import config as config_module
from memsvc.log import configure as configure_logging

log = logging.getLogger("memsvc.cli")

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memsvc", description="The memory sidecar for AI agents.")
    parser.add_argument("--version", action="version", version=f"memsvc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_parser = commands.add_parser("serve", help="run the gRPC service")
    config_module.add_arguments(serve_parser)
    migrate_parser = commands.add_parser(
        "migrate", help="apply pending schema migrations to the durable store, then exit"
    )
    config_module.add_arguments(migrate_parser)
    commands.add_parser("config", help="print the configuration table (Markdown)")
    cli_client.add_commands(commands)
    return parser


# The modules of the server extra (pyproject.toml's `server`; a test keeps the two in
# step): an install of the SDK alone has the CLI, whose serve and migrate need them.
SERVER_MODULES = (
    "grpc_health",
    "grpc_reflection",
    "redis",
    "psycopg",
    "psycopg_pool",
    "aiosqlite",
    "tenacity",
    "sortedcontainers",
    "numpy",
    "prometheus_client",
)


def _missing_server_modules() -> list[str]:
    """The server extra's modules this installation lacks (none imported)."""
    missing: list[str] = []
    for name in SERVER_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a finder that refuses it; a module without a spec
            found = False
        if not found:
            missing.append(name)
    return missing


class _Terminated(Exception):
    """SIGTERM stopped ``memsvc migrate``."""


async def _migrate(config: config_module.Config) -> None:
    # SIGTERM ends it, as SIGINT does: as a container's PID 1 (a migration Job, `docker
    # run IMAGE migrate`) a signal without a handler is ignored, and the stop would
    # wait out the grace period (its retries, another replica's migrations) for a
    # SIGKILL. Set first, before the store's imports; once the migrations are done
    # (and said so), a SIGTERM no longer stops the closing.
    migrating = asyncio.current_task()
    stopping = False
    done = False

    def terminate() -> None:
        nonlocal stopping
        if migrating is not None and not stopping and not done:
            stopping = True
            migrating.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminate)
    from memsvc.store import durable_store  # server dependencies: imported when needed

    store = durable_store(config)
    try:
        try:
            await store.open()
            applied = await store.migrate()
            version = await store.schema_version()
            done = True
        finally:
            await store.aclose()
    except asyncio.CancelledError:
        if stopping:
            raise _Terminated() from None
        raise
    log.info("schema at version %d; applied now: %s", version, applied or "none")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memsvc`` console script."""
    args = _parser().parse_args(argv)
    if args.command in cli_client.COMMANDS:
        return cli_client.run(args)
    if args.command == "config":
        sys.stdout.write(config_module.markdown_table())
        return 0
    if missing := _missing_server_modules():
        # An SDK-only install (`pip install memsvc`): one line, not a traceback.
        print(
            f"memsvc {args.command} needs the server extra: pip install 'memsvc[server]'"
            f" (missing: {', '.join(missing)})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    values = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        config = config_module.load(values)
    except config_module.ConfigError as error:
        print(f"memsvc: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "serve" and config.otel_tracing:
        from memsvc import tracing  # imports grpc: only when tracing is asked for

        try:
            tracing.check_installed()
        except tracing.TracingUnavailable as error:
            # A setting this installation cannot honour: refused as a configuration
            # error, before any backend is opened (migrate does not trace).
            print(f"memsvc: configuration error: {error}", file=sys.stderr)
            return EXIT_USAGE
    configure_logging(config.log_level, config.log_format)
    if args.command == "serve":
        # A client variable set for a server one: else the only sign is the start
        # line's "plaintext, no tokens".
        for warning in config_module.client_variable_warnings(config, os.environ):
            log.warning("%s", warning)
    try:
        if args.command == "migrate":
            asyncio.run(_migrate(config))
        else:
            from memsvc.server import serve  # server dependencies: imported when needed

            asyncio.run(serve(config))
    except KeyboardInterrupt:
        # serve handles SIGINT itself (a clean stop); an interrupted migrate did not
        # finish, which its caller (a script, a deploy step) must see.
        return EXIT_INTERRUPTED if args.command == "migrate" else 0
    except _Terminated:
        log.warning("memsvc migrate stopped by SIGTERM: its migrations may not be applied")
        return EXIT_TERMINATED
    except Exception as error:
        # An address in use, a backend unreachable, a data dir that cannot be made:
        # the message says what to fix. Anything else is a bug: its traceback too.
        log.error("memsvc %s failed: %s", args.command, error, exc_info=not _explained(error))
        return EXIT_FAILURE
    return 0


def _explained(error: Exception) -> bool:
    """Whether ``error``'s message says all an operator needs (no traceback)."""
    from memsvc.domain import BackendUnavailable  # a server module: loaded by now

    return isinstance(error, config_module.StartupError | OSError | BackendUnavailable)


if __name__ == "__main__":
    sys.exit(main())
