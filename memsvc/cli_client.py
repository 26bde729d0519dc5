"""The operator commands of ``memsvc``: a terminal client of a running memsvc.

Built on the SDK (``memsvc.client``), so it needs only the client's
dependencies. Every command prints readable text, or JSON with ``--json``
(``watch --json`` prints one JSON object per line). Errors print the status,
the reason and every bad field, and the exit code says what kind of failure it
was (docs/cli.md has the table), so scripts can act on it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import enum
import json
import math
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TextIO, TypeVar

import grpc

from memsvc.client import (
    TLS,
    AsyncClient,
    AsyncPager,
    EventType,
    GraphPruneRefused,
    LifecycleEvent,
    MemsvcError,
)
from memsvc.client._values import to_value
from memsvc.config import CLIENT_VARIABLES

T = TypeVar("T")

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Read by the client commands only; the server allows and ignores them.
ADDRESS_VARIABLE = "MEMSVC_ADDRESS"
TOKEN_FILE_VARIABLE = "MEMSVC_TOKEN_FILE"
# Flag destination -> variable, for the TLS options.
TLS_VARIABLES = {
    "tls_ca": "MEMSVC_TLS_CA",
    "tls_cert": "MEMSVC_TLS_CERT",
    "tls_key": "MEMSVC_TLS_KEY",
    "tls_server_name": "MEMSVC_TLS_SERVER_NAME",
}
assert {ADDRESS_VARIABLE, TOKEN_FILE_VARIABLE, *TLS_VARIABLES.values()} <= CLIENT_VARIABLES

# Exit codes: what a script can branch on.
EXIT_OK = 0
EXIT_FAILURE = 1  # anything else: INTERNAL, UNKNOWN, a bug
EXIT_USAGE = 2  # bad command line or INVALID_ARGUMENT
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4  # FAILED_PRECONDITION, ALREADY_EXISTS, ABORTED: the state said no
EXIT_UNAVAILABLE = 5  # UNAVAILABLE, DEADLINE_EXCEEDED: try again later
EXIT_LIMIT = 6  # RESOURCE_EXHAUSTED, OUT_OF_RANGE
EXIT_DENIED = 7  # UNAUTHENTICATED, PERMISSION_DENIED
EXIT_INTERRUPTED = 130

_EXIT_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_CONFLICT,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_CONFLICT,
    grpc.StatusCode.ABORTED: EXIT_CONFLICT,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_LIMIT,
    grpc.StatusCode.OUT_OF_RANGE: EXIT_LIMIT,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_DENIED,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_DENIED,
}

# --type of watch: every event type by name, and a session event's short name too.
EVENT_TYPE_NAMES = {
    **{t.value: t.value for t in EventType if t is not EventType.UNKNOWN},
    **{
        t.value.removeprefix("session_"): t.value
        for t in EventType
        if t.value.startswith("session_")
    },
}

# `watch` prints a notice when its first connection takes longer than this.
WATCH_NOTICE_SECONDS = 5.0

COMMANDS = (
    "sessions",
    "checkpoints",
    "spawn",
    "pause",
    "resume",
    "terminate",
    "get",
    "set",
    "episodes",
    "watch",
    "graph",
)

Handler = Callable[[AsyncClient, argparse.Namespace, TextIO], Awaitable[None]]


def add_commands(commands: Any) -> None:
    """Add the client commands to the ``memsvc`` parser's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address",
        help=f"memsvc's address, host:port or unix:PATH (default: ${ADDRESS_VARIABLE} "
        f"or {DEFAULT_ADDRESS})",
    )
    common.add_argument(
        "--token-file",
        help=f"a file holding the bearer token to send (default: ${TOKEN_FILE_VARIABLE})",
    )
    common.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the system's roots"
    )
    common.add_argument(
        "--tls-ca", help="PEM CA certificate(s) to trust for the server (implies --tls)"
    )
    common.add_argument(
        "--tls-cert", help="PEM client certificate, for mutual TLS (with --tls-key)"
    )
    common.add_argument("--tls-key", help="PEM private key of --tls-cert")
    common.add_argument(
        "--tls-server-name", help="the name the server's certificate must carry, if not the host"
    )
    common.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        help="seconds per call (more than 0; default 10)",
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of text")

    session = argparse.ArgumentParser(add_help=False, parents=[common])
    session.add_argument("-p", "--project", required=True, help="project id (a UUID)")
    session.add_argument("-a", "--agent", required=True, help="agent instance id (a UUID)")
    session.add_argument("-s", "--session", required=True, help="session id")

    sessions = commands.add_parser("sessions", help="list or show sessions")
    actions = sessions.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="a project's sessions")
    listing.add_argument("-p", "--project", required=True, help="project id (a UUID)")
    listing.add_argument("-a", "--agent", help="only this agent instance's")
    listing.add_argument(
        "--state", choices=("active", "paused", "terminated"), help="only sessions in this state"
    )
    listing.add_argument("--limit", type=_at_least(1), default=100, help=LIMIT_HELP)
    listing.set_defaults(handler=_list_sessions)
    actions.add_parser("show", parents=[session], help="one session").set_defaults(
        handler=_show_session
    )

    checkpoints = commands.add_parser("checkpoints", help="list a session's checkpoints")
    actions = checkpoints.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[session], help="newest first")
    listing.add_argument("--limit", type=_at_least(1), default=100, help=LIMIT_HELP)
    listing.set_defaults(handler=_list_checkpoints)

    graph = commands.add_parser("graph", help="LangGraph checkpoints of graph threads")
    actions = graph.add_subparsers(dest="action", required=True, metavar="ACTION")
    thread = argparse.ArgumentParser(add_help=False, parents=[common])
    thread.add_argument("-p", "--project", required=True, help="project id (a UUID)")
    thread.add_argument("-t", "--thread", required=True, help="thread id")
    listing = actions.add_parser("list", parents=[thread], help="a thread's checkpoints")
    listing.add_argument("--ns", help="only this checkpoint namespace (default: all)")
    listing.add_argument("--limit", type=_at_least(1), default=100, help=LIMIT_HELP)
    listing.set_defaults(handler=_list_graph_checkpoints)
    actions.add_parser("delete", parents=[thread], help="forget a thread").set_defaults(
        handler=_delete_graph_thread
    )
    prune = actions.add_parser("prune", parents=[thread], help="keep the latest checkpoints")
    prune.add_argument(
        "--delete",
        action="store_true",
        help="delete every checkpoint instead of all but the latest",
    )
    prune.add_argument(
        "--force",
        action="store_true",
        help="prune a thread that uses a LangGraph DeltaChannel too (its values are lost)",
    )
    prune.set_defaults(handler=_prune_graph_thread)

    spawn = commands.add_parser("spawn", parents=[session], help="spawn a session")
    spawn.add_argument("--agent-type", help="agent type id (a UUID)")
    spawn.add_argument(
        "--set",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=JSON",
        help="an initial entry",
    )
    spawn.set_defaults(handler=_spawn)

    pause = commands.add_parser("pause", parents=[session], help="pause into a checkpoint")
    pause.add_argument(
        "--checkpoint-id", help="the checkpoint's id (default: a time-ordered one the server makes)"
    )
    pause.set_defaults(handler=_pause)

    resume = commands.add_parser("resume", parents=[session], help="resume from a checkpoint")
    resume.add_argument("--checkpoint-id", help="default: the one the pause made")
    resume.add_argument("--merge", action="store_true", help="merge over the current entries")
    resume.set_defaults(handler=_resume)

    terminate = commands.add_parser("terminate", parents=[session], help="end a session")
    terminate.add_argument("--description", help="task description for the episode")
    terminate.add_argument(
        "--outcome",
        choices=("success", "failure", "partial"),
        help="the episode's (default: success)",
    )
    terminate.add_argument("--lesson", action="append", default=[], help="a lesson learned")
    terminate.add_argument("--skip-consolidation", action="store_true", help="no episode")
    terminate.add_argument(
        "--keep-working-memory",
        action="store_true",
        help="leave the working memory readable (writes are refused)",
    )
    terminate.set_defaults(handler=_terminate)

    get = commands.add_parser("get", parents=[session], help="read a working-memory key")
    get.add_argument("key")
    get.set_defaults(handler=_get)

    put = commands.add_parser("set", parents=[session], help="write a working-memory key")
    put.add_argument("key")
    put.add_argument(
        "value", type=_json_value, help="a JSON value (a bare word is taken as a string)"
    )
    put.add_argument(
        "--ttl",
        type=_ttl_seconds,
        help="seconds until it expires (more than 0); without it the key never expires,"
        " and a TTL it had is removed",
    )
    put.set_defaults(handler=_set)

    episodes = commands.add_parser("episodes", help="list or search episodes")
    actions = episodes.add_subparsers(dest="action", required=True, metavar="ACTION")
    # As many as the server's default page: 100 listed, the best 20 found.
    for name, handler, text, limit in (
        ("list", _list_episodes, "newest first", 100),
        ("search", _search_episodes, "ranked by relevance", 20),
    ):
        action = actions.add_parser(name, parents=[common], help=text)
        action.add_argument("-p", "--project", required=True, help="project id (a UUID)")
        if name == "search":
            action.add_argument("query")
        action.add_argument("-a", "--agent", help="only this agent instance's (a UUID)")
        action.add_argument("-s", "--session", help="only this session's (with -a)")
        action.add_argument(
            "--outcome", choices=("success", "failure", "partial"), help="only this outcome"
        )
        action.add_argument("--task-type", help="only this task type")
        action.add_argument(
            "--min-importance", type=float, help="only episodes at least this important (0-1)"
        )
        action.add_argument("--limit", type=_at_least(1), default=limit, help=LIMIT_HELP)
        action.set_defaults(handler=handler)

    watch = commands.add_parser(
        "watch", parents=[common], help="print lifecycle events live, resuming after reconnects"
    )
    watch.add_argument("-p", "--project", help="only this project's events (a UUID)")
    watch.add_argument("-a", "--agent", help="only this agent instance's (a UUID)")
    watch.add_argument("-s", "--session", help="only this session's")
    watch.add_argument(
        "--type",
        action="append",
        default=[],
        dest="types",
        type=_event_type,
        help="an event type (repeatable): " + ", ".join(EVENT_TYPE_NAMES),
    )
    start = watch.add_mutually_exclusive_group()
    start.add_argument(
        "--after", type=_at_least(0), help="start after this sequence (a saved cursor)"
    )
    start.add_argument("--from-oldest", action="store_true", help="every retained event")
    watch.add_argument("--count", type=_at_least(1), help="stop after this many events")
    watch.set_defaults(handler=_watch)


def _tls(args: argparse.Namespace, env: Mapping[str, str]) -> TLS | None:
    """The TLS settings of the flags, else of the MEMSVC_TLS_* variables (None: plaintext)."""
    given = {
        name: getattr(args, name, None) or env.get(variable) or None
        for name, variable in TLS_VARIABLES.items()
    }
    if not getattr(args, "tls", False) and not any(given.values()):
        return None
    return TLS(
        ca_file=given["tls_ca"],
        cert_file=given["tls_cert"],
        key_file=given["tls_key"],
        server_name=given["tls_server_name"],
    )


def connect(args: argparse.Namespace, env: Mapping[str, str]) -> AsyncClient:
    """The client the flags (or the MEMSVC_* client variables) describe.

    ValueError or OSError when a token or TLS file cannot be used.
    """
    address = args.address or env.get(ADDRESS_VARIABLE) or DEFAULT_ADDRESS
    token_file = getattr(args, "token_file", None) or env.get(TOKEN_FILE_VARIABLE) or None
    return AsyncClient(address, timeout=args.timeout, token_file=token_file, tls=_tls(args, env))


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run one client command; return its exit code."""
    import os

    address = args.address or os.environ.get(ADDRESS_VARIABLE) or DEFAULT_ADDRESS
    handler: Handler = args.handler
    refusal = _not_utf8(args, os.environ)
    if refusal is not None:
        err.write(f"memsvc: {refusal}\n")
        return EXIT_USAGE
    try:
        client = connect(args, os.environ)  # opens nothing yet
    except (OSError, ValueError) as error:  # a token or TLS file that cannot be used
        err.write(f"memsvc: {error}\n")
        return EXIT_USAGE

    async def main() -> None:
        async with client:
            await handler(client, args, out)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except MemsvcError as error:
        err.write(describe_error(error, address))
        return _EXIT_BY_CODE.get(error.code, EXIT_FAILURE)
    except BrokenPipeError:  # `memsvc watch | head`
        return EXIT_OK
    return EXIT_OK


# Options naming files: a path may hold any bytes the system allows.
_PATH_OPTIONS = frozenset({"token_file", "tls_ca", "tls_cert", "tls_key"})
# The other client variables, by the flag that wins over each.
_TEXT_VARIABLES = {"address": ADDRESS_VARIABLE, "tls_server_name": TLS_VARIABLES["tls_server_name"]}


def _not_utf8(args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    """What is wrong with the first argument (or client variable) that is not UTF-8
    (None: none is).

    Python reads such bytes of the command line as lone surrogates, which no request
    can carry: refused here, for every command, before any call."""
    given = [
        (f"argument {name}", value)
        for name, value in vars(args).items()
        if name not in _PATH_OPTIONS
    ]
    given += [
        (f"${variable}", env.get(variable))
        for name, variable in _TEXT_VARIABLES.items()
        if not getattr(args, name, None)
    ]
    for name, value in given:
        for text in _strings(value):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return f"{name} is not valid UTF-8: {_escaped(text)}"
    return None


def _escaped(text: str) -> str:
    """``text`` with the bytes that are not UTF-8 shown as escapes (``r\\xffun``)."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate the command line's bytes do not make
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _strings(value: Any) -> list[str]:
    """The strings in a parsed argument (lists and KEY=JSON pairs included)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [text for item in value for text in _strings(item)]
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in (*_strings(key), *_strings(item))]
    return []


def describe_error(error: MemsvcError, address: str) -> str:
    """What an operator reads: the status, the reason, what to fix."""
    reason = f" ({error.reason})" if error.reason else ""
    # With field violations, the message only repeats them: list them one per line.
    message = "invalid request" if error.violations else error.message
    lines = [f"memsvc: {error.code.name}{reason}: {message}"]
    lines += [f"  {field}: {problem}" for field, problem in error.violations.items()]
    if error.reason == "ERROR_REASON_BACKEND_UNAVAILABLE":
        lines.append("  memsvc answered; the backend named above is down or unreachable")
    elif error.code == grpc.StatusCode.UNAVAILABLE:
        lines.append(
            f"  is memsvc running at {address}? (--address or ${ADDRESS_VARIABLE}; "
            "--tls-ca if it serves TLS)"
        )
    elif error.code == grpc.StatusCode.UNAUTHENTICATED:
        lines.append(f"  send a valid token: --token-file or ${TOKEN_FILE_VARIABLE}")
    elif isinstance(error, GraphPruneRefused):
        lines.append("  --force prunes it anyway, emptying its DeltaChannel values")
    return "\n".join(lines) + "\n"


# Handlers ---------------------------------------------------------------------

LIMIT_HELP = "at most this many (default: %(default)s); stderr says when more exist"


async def _first(pager: AsyncPager[T], limit: int) -> list[T]:
    """The first ``limit`` items, saying on stderr when there are more (a listing
    cut without a word passed for the whole one). A page token says so: no page
    is read for it (a search would run again)."""
    items: list[T] = []
    more = False
    async for page in pager.pages():
        items.extend(page.items)
        more = len(items) > limit or page.next_page_token is not None
        if len(items) >= limit:
            break
    if more:
        sys.stderr.write(f"memsvc: showing the first {limit}; there are more (--limit)\n")
    return items[:limit]


async def _list_sessions(client: AsyncClient, args: argparse.Namespace, out: TextIO) -> None:
    pager = client.list_sessions(args.project, agent_instance_id=args.agent, state=args.state)
    sessions = await _first(pager, args.limit)
    if args.json:
        return _json(out, sessions)
    for s in sessions:
        out.write(
            f"{s.agent_instance_id} {s.session_id}  {s.state.value:<10} v{s.version}"
            f"  created {_time(s.create_time)}  updated {_time(s.update_time)}\n"
        )


async def _show_session(client: AsyncClient, args: argparse.Namespace, out: TextIO) -> None:
    session = await _session(client, args).describe()
    _show(out, args, session)


async def _list_checkpoints(client: AsyncClient, args: argparse.Namespace, out: TextIO) -> None:
    checkpoints = await _first(_session(client, args).checkpoints(), args.limit)
    if args.json:
        return _json(out, checkpoints)
    for c in checkpoints:
        expires = _time(c.expire_time) if c.expire_time else "never (resume point)"
        out.write(
            f"{c.checkpoint_id}  {_time(c.create_time)}  {c.key_count} keys"
            f"  {c.size_bytes} bytes  expires {expires}\n"
        )


async def _list_graph_checkpoints(
    client: AsyncClient, args: argparse.Namespace, out: TextIO
) -> None:
    pager = client.graphs(args.project).checkpoints(args.thread, checkpoint_ns=args.ns)
    found = await _first(pager, args.limit)
    rows = [
        {
            "checkpoint_id": c.checkpoint_id,
            "checkpoint_ns": c.checkpoint_ns,
            "parent_checkpoint_id": c.parent_checkpoint_id or None,
            "create_time": _time(c.create_time.ToDatetime(UTC)),
            "metadata": json.loads(c.metadata_json or "{}"),
            "channels": len(c.channel_versions),
            "pending_writes": len(c.pending_writes),
            "value_bytes": sum(len(v.value.data) for v in c.channel_values),
        }
        for c in found
    ]
    if args.json:
        return _json(out, rows)
    for row in rows:
        ns = f"  ns {row['checkpoint_ns']!r}" if row["checkpoint_ns"] else ""
        step = row["metadata"].get("step", "-")
        source = row["metadata"].get("source", "-")
        out.write(
            f"{row['checkpoint_id']}{ns}  {row['create_time']}  step {step} ({source})"
            f"  {row['channels']} channels  {row['value_bytes']} bytes"
            f"  {row['pending_writes']} writes\n"
        )


async def _delete_graph_thread(client: AsyncClient, args: argparse.Namespace, out: TextIO) -> None:
    deleted = await client.graphs(args.project).delete_thread(args.thread)
    _show(out, args, {"checkpoints_deleted": deleted}, f"deleted {deleted} checkpoint(s)")


async def _prune_graph_thread(client: AsyncClient, args: argparse.Namespace, out: TextIO) -> None:
    strategy: Literal["keep_latest", "delete"] = "delete" if args.delete else "keep_latest"
    deleted = await client.graphs(args.project).prune(
        [args.thread], strategy=strategy, force=args.force
    )
    _show(out, args, {"checkpoints_deleted": deleted}, f"deleted {deleted} checkpoint(s)")


async def _spawn(client: AsyncClient, args: argparse.Namespace, out: TextIO) -> None:
    initial = dict(args.set)
    session = await _session(client, args).spawn(initial=initial, agent_type_id=args.agent_type)
    _show(out, args, session)


async def _pause(client: AsyncClient, args: argparse.Namespace, out: TextIO) -> None:
    result = await _session(client, args).pause(checkpoint_id=args.checkpoint_id)
    _show(out, args, result, f"paused into checkpoint {result.checkpoint.checkpoint_id}")


async def _resume(client: AsyncClient, args: argparse.Namespace, out: TextIO) -> None:
    result = await _session(client, args).resume(checkpoint_id=args.checkpoint_id, merge=args.merge)
    text = (
        f"resumed from checkpoint {result.checkpoint.checkpoint_id}"
        f" ({result.entries_restored} entries)"
    )
    _show(out, args, result, text)


async def _terminate(client: AsyncClient, args: argparse.Namespace, out: TextIO) -> None:
    result = await _session(client, args).terminate(
        task_description=args.description,
        outcome=args.outcome,
        lessons_learned=args.lesson,
        consolidate=not args.skip_consolidation,
        keep_working_memory=args.keep_working_memory,
    )
    episode = f", episode {result.episode_id}" if result.episode_id else ""
    _show(out, args, result, f"terminated ({result.outcome.value}{episode})")


async def _get(client: AsyncClient, args: argparse.Namespace, out: TextIO) -> None:
    entry = await _session(client, args).get_entry(args.key)
    if args.json:
        return _json(out, entry)
    out.write(_dumps(entry.value) + "\n")


async def _set(client: AsyncClient, args: argparse.Namespace, out: TextIO) -> None:
    result = await _session(client, args).set(args.key, args.value, ttl=args.ttl)
    expires = f", expires {_time(result.expire_time)}" if result.expire_time else ""
    _show(out, args, result, f"{'created' if result.created else 'replaced'} {args.key}{expires}")


async def _list_episodes(client: AsyncClient, args: argparse.Namespace, out: TextIO) -> None:
    episodes = await _first(
        client.episodes(args.project).list(**_episode_filters(args)), args.limit
    )
    if args.json:
        return _json(out, episodes)
    for e in episodes:
        out.write(f"{e.episode_id}  {_time(e.create_time)}  {e.outcome.value:<8} {e.task_type}"
                  f"  {e.task_description[:80]}\n")  # fmt: skip


async def _search_episodes(client: AsyncClient, args: argparse.Namespace, out: TextIO) -> None:
    pager = client.episodes(args.project).search(args.query, **_episode_filters(args))
    results = await _first(pager, args.limit)
    if args.json:
        return _json(out, results)
    for r in results:
        out.write(f"{r.score:10.4g}  {r.episode.episode_id}  {r.episode.task_type}"
                  f"  {r.episode.task_description[:80]}\n")  # fmt: skip


async def _watch(client: AsyncClient, args: argparse.Namespace, out: TextIO) -> None:
    # The watch reconnects forever: say so when the first connection does not come.
    notice = asyncio.get_running_loop().call_later(
        WATCH_NOTICE_SECONDS,
        lambda: sys.stderr.write(
            f"memsvc: no answer from {client.target} yet; still trying (Ctrl-C to stop)\n"
        ),
    )
    seen = 0
    try:
        async with client.watch(
            args.project,
            agent_instance_id=args.agent,
            session_id=args.session,
            event_types=args.types or None,
            after_sequence=args.after,
            start="oldest" if args.from_oldest else "now",
        ) as events:
            notice.cancel()  # connected: the server sent its first message
            async for event in events:
                out.write(_json_line(event) if args.json else event_line(event))
                out.flush()
                seen += 1
                if args.count is not None and seen >= args.count:
                    return
    finally:
        notice.cancel()


# Formatting -----------------------------------------------------------------------


def event_line(event: LifecycleEvent) -> str:
    """One readable line per event: sequence, time, type, session, what it names."""
    if event.purged:
        return f"#{event.sequence} {_time(event.event_time)} {event.event_type.value} (purged)\n"
    parts = [
        f"#{event.sequence}",
        _time(event.event_time),
        event.event_type.value,
        f"{event.project_id}/{event.agent_instance_id}/{event.session_id}",
    ]
    if event.checkpoint_id:
        parts.append(f"checkpoint={event.checkpoint_id}")
    if event.episode_id:
        parts.append(f"episode={event.episode_id}")
    return " ".join(parts) + "\n"


def _session(client: AsyncClient, args: argparse.Namespace) -> Any:
    return client.session(args.project, args.agent, args.session)


def _episode_filters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "agent_instance_id": args.agent,
        "session_id": args.session,
        "outcome": args.outcome,
        "task_type": args.task_type,
        "min_importance": args.min_importance,
    }


def _json_value(text: str) -> Any:
    """An argparse type: a JSON value, or a bare word that is not JSON as a string.
    Text that starts like JSON but does not parse, and values the SDK refuses (NaN,
    integers past 2**53), are usage errors (exit code 2), not strings."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip()[:1] in ("{", "[", '"'):
            raise argparse.ArgumentTypeError(f"is not valid JSON ({error}): {text!r}") from None
        return text
    try:
        to_value(value)
    except (ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _event_type(text: str) -> str:
    """An argparse type: an event type by name (``session_paused``), or a session
    event's short name (``paused``)."""
    name = EVENT_TYPE_NAMES.get(text.lower())
    if name is None:
        raise argparse.ArgumentTypeError(
            f"unknown event type {text!r}; one of {', '.join(EVENT_TYPE_NAMES)}"
        )
    return name


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _key_value(item: str) -> tuple[str, Any]:
    """An argparse type: a bad one is a usage error (exit code 2)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expects KEY=JSON, got {item!r}")
    return key, _json_value(text)


def _seconds(text: str) -> float:
    """An argparse type for durations: finite and not negative."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expects a finite number of seconds >= 0, got {text!r}")
    return value


# The longest protobuf Duration (10,000 years): a TTL the request can carry.
_MAX_DURATION_SECONDS = 315_576_000_000


def _ttl_seconds(text: str) -> float:
    """An argparse type for a TTL: more than 0 (0 would mean none) and a Duration."""
    value = _positive_seconds(text)
    if value > _MAX_DURATION_SECONDS:
        raise argparse.ArgumentTypeError(f"expects at most {_MAX_DURATION_SECONDS} seconds")
    return value


def _positive_seconds(text: str) -> float:
    """An argparse type for a timeout: finite and more than 0."""
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expects more than 0 seconds")
    return value


def _show(out: TextIO, args: argparse.Namespace, value: Any, text: str | None = None) -> None:
    if args.json:
        _json(out, value)
    elif text is not None:
        out.write(text + "\n")
    else:
        for name, field in _plain(value).items():
            shown = _dumps(field, ensure_ascii=True) if isinstance(field, dict | list) else field
            out.write(f"{name}: {'-' if field is None else shown}\n")


def _json(out: TextIO, value: Any) -> None:
    out.write(_dumps(value, indent=2) + "\n")


def _json_line(value: Any) -> str:
    return _dumps(value, separators=(",", ":")) + "\n"


def _dumps(value: Any, *, ensure_ascii: bool = False, **options: Any) -> str:
    """``value`` as JSON, never with NaN or Infinity (not JSON; ``_plain`` spells them)."""
    return json.dumps(_plain(value), ensure_ascii=ensure_ascii, allow_nan=False, **options)


# The numbers JSON cannot carry (raw gRPC can store them in a google.protobuf.Value),
# spelt as protobuf's JSON mapping spells a double's.
_NAN = "NaN"
_INFINITY = "Infinity"


def _plain(value: Any) -> Any:
    """The SDK's dataclasses as JSON-ready values (times in RFC 3339, enums by value,
    NaN and the infinities as the strings "NaN", "Infinity" and "-Infinity")."""
    if isinstance(value, float) and not math.isfinite(value):
        return _NAN if math.isnan(value) else _INFINITY if value > 0 else f"-{_INFINITY}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, datetime):
        return _time(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _time(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def client_main(argv: Sequence[str]) -> int:
    """Parse and run a client command alone (used by tests)."""
    parser = argparse.ArgumentParser(prog="memsvc")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))
