"""Listing depth: does a deep page of ListSessions cost what the first one does?

A listing's next page starts at its cursor (memsvc/store/_budgeted_sql.py,
``next_page_condition``, and the indexes of PostgreSQL migration 0013 / SQLite
0011); before, page k read every row before its cursor again. This walks the
store's ``list_sessions`` (no gRPC: the store's cost alone) page by page, 100
rows a page, over ``--sessions`` sessions of one project in 50 agents plus one
agent with ``--agent-sessions`` of its own, on a private PostgreSQL database and
a SQLite file, and reports the mean time of the first and of the last 10 pages.
Its own baseline is the first pages: "last / first" near 1 is a flat cost.
Rerun (about a minute)::

    flock /tmp/memsvc-bench.lock .venv/bin/python -m bench.list_depth
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from bench.lifecycle import POSTGRES_ADMIN_URL
from memsvc.store.postgres import PostgresDurableStore
from memsvc.store.sqlite import SqliteDurableStore
from memsvc.testing import create_postgres_database, drop_postgres_database

PROJECT = str(uuid.uuid4())
BIG_AGENT = str(uuid.uuid4())
AGENTS = [str(uuid.uuid4()) for _ in range(50)]
PAGE = 100
START = datetime(2026, 1, 1, tzinfo=UTC)


def _rows(sessions: int, agent_sessions: int) -> list[tuple[str, str, int]]:
    """(agent, session id, ms after START): three sessions per millisecond, so that
    pages cut through ties."""
    rows = [(AGENTS[i % len(AGENTS)], f"s{i}", i // 3) for i in range(sessions)]
    rows += [(BIG_AGENT, f"b{i}", i // 3) for i in range(agent_sessions)]
    return rows


def _fill_postgres(url: str, rows: list[tuple[str, str, int]]) -> None:
    with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cursor:
        with cursor.copy(
            "COPY sessions (project_id, agent_instance_id, session_id, state, metadata,"
            " version, memory_epoch, create_time, update_time, metadata_bytes) FROM STDIN"
        ) as copy:
            for agent, session, ms in rows:
                moment = START + timedelta(milliseconds=ms)
                copy.write_row((PROJECT, agent, session, 1, "{}", 1, "e", moment, moment, 2))
        conn.execute("ANALYZE sessions")


def _fill_sqlite(path: Path, rows: list[tuple[str, str, int]]) -> None:
    db = sqlite3.connect(path)
    stamped = []
    for agent, session, ms in rows:
        moment = START + timedelta(milliseconds=ms)
        text = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
        stamped.append((PROJECT, agent, session, 1, "{}", 1, "e", text, text, 2))
    db.executemany(
        "INSERT INTO sessions (project_id, agent_instance_id, session_id, state, metadata,"
        " version, memory_epoch, create_time, update_time, metadata_bytes)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        stamped,
    )
    db.commit()
    db.close()


async def _walk(store: Any, agent: str | None) -> tuple[int, float, float]:
    """Pages walked, and the mean ms of the first and of the last 10."""
    times: list[float] = []
    before = None
    while True:
        started = time.perf_counter()
        page, _ = await store.list_sessions(PROJECT, agent, None, before, PAGE, 1 << 22)
        times.append((time.perf_counter() - started) * 1000)
        if len(page) < PAGE:
            break
        last = page[-1]
        before = (last.create_ms, last.ref.agent_instance_id, last.ref.session_id)
    return len(times), statistics.mean(times[1:11]), statistics.mean(times[-10:])


async def _measure(store: Any, name: str, fill: Callable[[], None]) -> list[str]:
    """Open and migrate ``store``, ``fill`` it, and walk both listings."""
    await store.open()
    try:
        await store.migrate()
        fill()
        lines = []
        for label, agent in (("a project's sessions", None), ("one agent's sessions", BIG_AGENT)):
            pages, first, last = await _walk(store, agent)
            lines.append(
                f"| {name} | {label} | {pages:,} | {first:.2f} | {last:.2f} | {last / first:.2f} |"
            )
        return lines
    finally:
        await store.aclose()


async def _run(args: argparse.Namespace) -> list[str]:
    rows = _rows(args.sessions, args.agent_sessions)
    url = create_postgres_database(POSTGRES_ADMIN_URL, "memsvc_list_depth")
    try:
        lines = await _measure(
            PostgresDurableStore(url), "PostgreSQL", lambda: _fill_postgres(url, rows)
        )
    finally:
        drop_postgres_database(POSTGRES_ADMIN_URL, url)
    with tempfile.TemporaryDirectory(prefix="memsvc-bench-") as workdir:
        path = Path(workdir) / "memsvc.db"
        lines += await _measure(
            SqliteDurableStore(f"sqlite://{path}"), "SQLite", lambda: _fill_sqlite(path, rows)
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=200_000, help="in 50 agents")
    parser.add_argument("--agent-sessions", type=int, default=30_000, help="of one more agent")
    args = parser.parse_args(argv)
    lines = asyncio.run(_run(args))
    print(f"{args.sessions:,} sessions in 50 agents and {args.agent_sessions:,} of one more,")
    print(f"{PAGE} a page; mean ms of pages 2-11 and of the last 10")
    print()
    print("| Store | Listing | Pages | First pages (ms) | Last pages (ms) | Last / first |")
    print("|---|---|--:|--:|--:|--:|")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
