"""Episodic-memory benchmark: RecordEpisode throughput, and ListEpisodes and
SearchEpisodes latency on PostgreSQL, beside a bare grpc.aio echo of the same
response size, in the same run.

Two servers, each in its own process, on 127.0.0.1:

* ``memsvc``: ``memsvc serve --working-memory-url redis://127.0.0.1:6379/0
  --database-url <private PostgreSQL database>``, the database made for the run
  and dropped at the end. With ``--git-ref REF`` memsvc runs as committed at
  REF (``git archive``), not from the work tree.
* ``echo``: bench/_lifecycle_echo.py, a bare grpc.aio server with identity
  (de)serializers. Before each echo measurement it is loaded (``Load``) with
  the serialized bytes of the memsvc response just measured, which ``Resume``
  then returns to every call (the request is a fixed 100 bytes, about what a
  List or Search request is). The client parses that answer as the memsvc
  response type, as the memsvc stub does, so both sides of a row move and
  parse the same bytes; the difference is memsvc's server work.

What is measured, this process being the client:

* **Load** (once): ``--episodes`` episodes (100,000) of one project, spread
  over ``--agents`` agent instances (100, 10 sessions each), recorded with
  RecordEpisode by ``--concurrency`` callers (16) sharing one channel:
  episodes/s, call p50/p99, and the CPU the server and PostgreSQL spent per
  episode. The texts are drawn from a fixed vocabulary (seeded, so every run
  records the same texts); ``flamegraph`` is planted in 1% of the episodes
  and ``kubernetes`` in 30% (in the description, the context summary or a
  lesson), and neither occurs otherwise. The hit counts are checked in the
  database afterwards. No embeddings, unless ``--dims`` gives every other
  episode one. Then ``VACUUM (ANALYZE) episodes`` (the steady state
  autovacuum would reach: statistics, and the GIN pending list merged;
  ``--no-vacuum`` leaves it out).
* **Reads**, ``--runs`` times (3): first-page ``ListEpisodes`` (no filter),
  ``SearchEpisodes`` for the selective term and for the broad term, all with
  ``--page-size`` 20. For each, memsvc and then the echo of its response:
  one caller, sequential calls, 1 s warm-up, then ``--seconds`` (5) measured;
  p50 and p99 latency, and the CPU time per call of the server process and of
  the PostgreSQL backends connected to the run's database (from
  /proc/<pid>/task/*/schedstat).

The table shows, per operation, the median over the runs of each run's
p50 and p99, and of the ratio memsvc p50 / echo p50 (computed within each run).
Targets (from the issue), as medians of 3 runs: List p50 under 10 ms and
selective Search p50 under 50 ms through gRPC. The 2-core machine is shared by
this client, memsvc, the echo server and PostgreSQL.

Rerun (results in bench/results/episodic.json; at the 800-950 episodes/s of a
2,000-episode smoke run here, the load of 100,000 takes about 2 minutes and the
reads about 2 more)::

    .venv/bin/python -m bench.episodic --git-ref HEAD
    .venv/bin/python -m bench.episodic --episodes 2000 --seconds 1 --runs 1  # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shlex
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
from google.protobuf.message import Message

from bench._echo_server import identity
from bench._lifecycle_echo import CHANNEL_OPTIONS, LOAD_METHOD, RESUME_METHOD, SMALL
from bench.lifecycle import (
    POSTGRES_ADMIN_URL,
    REDIS_URL,
    _database,
    _git_describe,
    _memsvc_at,
    cpu_ns,
    postgres_pids,
)
from bench.watch import _median, _percentiles_ms
from bench.working_memory import (
    MEMSVC,
    ROOT,
    WARMUP_SECONDS,
    Target,
    _delete_redis_keys,
    _drive,
    _server,
    machine,
)
from memsvc.testing import BackendUnreachable, free_port, require_backend
from memsvc.v1 import episodic_pb2 as pb
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.episodic_pb2_grpc import EpisodicMemoryServiceStub

RESULTS = ROOT / "bench" / "results" / "episodic.json"
SEED = 20261125
SESSIONS_PER_AGENT = 10
SELECTIVE_TERM = "flamegraph"  # the english stemmer keeps it: 'flamegraph'
BROAD_TERM = "kubernetes"  # stemmed to 'kubernet'
SELECTIVE_SHARE = 0.01
BROAD_SHARE = 0.30
LIST_P50_TARGET_MS = 10.0
SELECTIVE_SEARCH_P50_TARGET_MS = 50.0
OPS = ("List", "Search selective", "Search broad")
TASK_TYPES = ("code_review", "bug_fix", "deployment", "research", "refactor", "incident")
OUTCOMES = (lc.OUTCOME_SUCCESS, lc.OUTCOME_FAILURE, lc.OUTCOME_PARTIAL)
TOOLS = ("shell", "editor", "web_search", "test_runner", "git", "http")
# Ordinary engineering prose; none of it stems to either planted term.
_PROSE = """
    agent analysis api approach artifact assumption audit backend backlog batch benchmark
    branch budget buffer build bundle cache callback candidate certificate change channel
    check client cluster code column commit compiler config connection constraint container
    context contract coverage credential cursor dashboard data database deadline debug
    default dependency deploy design diagnosis diff disk document domain draft driver
    endpoint environment error estimate event evidence exception experiment failure feature
    field file filter fix flag format function gateway graph handler hash header heap hint
    hypothesis image import incident index input instance integration interface issue job
    kernel key latency layer library limit lint load lock log loop manifest memory merge
    message method metric migration mock model module monitor mutex namespace network node
    note object offset operator option order output owner package page parser patch path
    payload performance permission pipeline plan plugin pointer policy pool port priority
    probe process profile project prompt protocol proxy query queue quota race ranking
    record recovery redirect regression release replica report repository request resource
    response result retry review risk rollback rollout route rule runtime sample scheduler
    schema scope script search secret segment selector server service session shard signal
    snapshot socket source spec stack state status step storage stream string summary
    support switch symbol table target task template tenant test thread threshold timeout
    token tool trace traffic transaction trigger type update upgrade user validation value
    variable vector version volume warning webhook window worker workflow
    added adjusted analysed blocked broke caught changed checked cleaned confirmed copied
    created dropped enabled failed fixed found improved increased isolated kept logged
    measured missed moved noticed opened passed pinned reduced removed renamed replaced
    restarted reverted ran saved shipped skipped split started stopped tested traced
    tried updated verified wrote
    after again before carefully correctly during early eventually faster first quickly
    later locally manually often once partly safely slowly twice usually
"""
VOCABULARY = tuple(_PROSE.split())


# --- the episodes ------------------------------------------------------------------


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.choices(VOCABULARY, k=rng.randint(low, high))


def _sentence(words: list[str]) -> str:
    return " ".join(words).capitalize() + "."


def _plant(rng: random.Random, parts: list[list[str]], term: str) -> None:
    """Put ``term`` at a random place of one of the searchable texts."""
    part = rng.choice(parts)
    part.insert(rng.randint(0, len(part)), term)


@dataclass(frozen=True)
class Corpus:
    """Which episodes (by index) carry the planted terms, decided up front."""

    episodes: int
    agents: list[str]
    selective: frozenset[int]
    broad: frozenset[int]

    @classmethod
    def make(cls, episodes: int, agents: int) -> Corpus:
        rng = random.Random(SEED)
        agent_ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(agents)]
        selective = frozenset(rng.sample(range(episodes), round(episodes * SELECTIVE_SHARE)))
        broad = frozenset(rng.sample(range(episodes), round(episodes * BROAD_SHARE)))
        return cls(episodes, agent_ids, selective, broad)

    def episode(self, project_id: str, index: int, dimensions: int) -> pb.Episode:
        """Episode ``index``: the same texts on every run (seeded by the index)."""
        rng = random.Random(SEED * 1_000_003 + index)
        description = _words(rng, 8, 20)
        summary = _words(rng, 60, 140)
        lessons = [_words(rng, 8, 18) for _ in range(rng.randint(1, 3))]
        parts = [description, summary, *lessons]
        if index in self.selective:
            _plant(rng, parts, SELECTIVE_TERM)
        if index in self.broad:
            _plant(rng, parts, BROAD_TERM)
        episode = pb.Episode(
            project_id=project_id,
            agent_instance_id=self.agents[index % len(self.agents)],
            session_id=f"session-{index // len(self.agents) % SESSIONS_PER_AGENT}",
            task_type=rng.choice(TASK_TYPES),
            task_description=_sentence(description),
            outcome=rng.choice(OUTCOMES),
            outcome_details=_sentence(_words(rng, 5, 15)),
            context_summary=" ".join(
                _sentence(summary[start : start + 12]) for start in range(0, len(summary), 12)
            ),
            lessons_learned=[_sentence(lesson) for lesson in lessons],
            tokens_used=rng.randint(500, 50_000),
            importance=round(rng.random(), 3),
        )
        for step in range(rng.randint(1, 4)):
            episode.actions.add().update(
                {"step": step, "tool": rng.choice(TOOLS), "ok": rng.random() < 0.8}
            )
        episode.metadata.update({"source": "bench", "index": index})
        episode.duration.FromMilliseconds(rng.randint(1_000, 600_000))
        if dimensions and index % 2 == 0:  # every other episode has an embedding
            episode.embedding.extend(rng.uniform(-1.0, 1.0) for _ in range(dimensions))
        return episode


# --- load ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    episodes: int
    timed_episodes: int  # after the warm-up batch
    seconds: float
    episodes_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_us: float  # per timed episode
    postgres_cpu_us: float
    vacuum_seconds: float | None
    matches: dict[str, int]  # term -> episodes matching it in the database
    planted: dict[str, int]


def _postgres_cpu_ns(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_ns(pid)
    return total


async def _record_all(
    stub: EpisodicMemoryServiceStub,
    corpus: Corpus,
    project_id: str,
    indexes: range,
    concurrency: int,
    dimensions: int,
    latencies: list[float],
) -> None:
    """Record the episodes of ``indexes`` with ``concurrency`` callers."""
    next_index = iter(indexes)
    report_every = max(1, corpus.episodes // 10)

    async def caller() -> None:
        for index in next_index:  # shared: each index is taken by one caller
            request = pb.RecordEpisodeRequest(episode=corpus.episode(project_id, index, dimensions))
            started = time.perf_counter()
            await stub.RecordEpisode(request)
            latencies.append(time.perf_counter() - started)
            if (index + 1) % report_every == 0:
                print(f"recorded {index + 1:,} of {corpus.episodes:,}", file=sys.stderr)

    await asyncio.gather(*(caller() for _ in range(concurrency)))


def _count_matches(database_url: str, project_id: str) -> dict[str, int]:
    """Episodes matching each planted term, as memsvc's PostgreSQL search matches them."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        counts = {}
        for term in (SELECTIVE_TERM, BROAD_TERM):
            row = conn.execute(
                "SELECT count(*) FROM episodes WHERE project_id = %s"
                " AND search_document @@ websearch_to_tsquery('english', %s)",
                (project_id, f'"{term}"'),
            ).fetchone()
            counts[term] = int(row[0]) if row else 0
        row = conn.execute(
            "SELECT count(*) FROM episodes WHERE project_id = %s", (project_id,)
        ).fetchone()
        counts["*"] = int(row[0]) if row else 0
    return counts


def _vacuum(database_url: str) -> float:
    started = time.perf_counter()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) episodes")
    return time.perf_counter() - started


async def load(
    args: argparse.Namespace,
    memsvc: Target,
    channel: grpc.aio.Channel,
    corpus: Corpus,
    project_id: str,
    database_url: str,
) -> LoadResult:
    stub = EpisodicMemoryServiceStub(channel)
    warmup = min(corpus.episodes, args.concurrency * 4)
    await _record_all(stub, corpus, project_id, range(warmup), args.concurrency, args.dims, [])
    pids = postgres_pids([database_url])  # the pool's connections are open by now
    server0, postgres0 = cpu_ns(memsvc.pid), _postgres_cpu_ns(pids)
    latencies: list[float] = []
    started = time.perf_counter()
    await _record_all(
        stub,
        corpus,
        project_id,
        range(warmup, corpus.episodes),
        args.concurrency,
        args.dims,
        latencies,
    )
    seconds = time.perf_counter() - started
    server_ns, postgres_ns = cpu_ns(memsvc.pid) - server0, _postgres_cpu_ns(pids) - postgres0
    timed = len(latencies)
    p50, p99 = _percentiles_ms(latencies)
    planted = {SELECTIVE_TERM: len(corpus.selective), BROAD_TERM: len(corpus.broad)}
    planted["*"] = corpus.episodes
    matches = _count_matches(database_url, project_id)
    if matches != planted:
        raise RuntimeError(f"episodes matching in the database {matches}, planted {planted}")
    vacuum_seconds = None if args.no_vacuum else _vacuum(database_url)
    result = LoadResult(
        episodes=corpus.episodes,
        timed_episodes=timed,
        seconds=seconds,
        episodes_per_s=timed / seconds if seconds > 0 else float("nan"),
        p50_ms=p50,
        p99_ms=p99,
        server_cpu_us=server_ns / 1e3 / max(timed, 1),
        postgres_cpu_us=postgres_ns / 1e3 / max(timed, 1),
        vacuum_seconds=vacuum_seconds,
        matches=matches,
        planted=planted,
    )
    vacuum = "skipped" if vacuum_seconds is None else f"{vacuum_seconds:.1f} s"
    print(
        f"load: {timed:,} episodes in {seconds:.1f} s, {result.episodes_per_s:,.0f} episodes/s, "
        f"p50 {p50:.2f} ms, p99 {p99:.2f} ms; matches {matches}; VACUUM (ANALYZE) {vacuum}",
        file=sys.stderr,
    )
    return result


# --- reads ---------------------------------------------------------------------------

Call = Callable[[], Awaitable[Message]]


@dataclass(frozen=True)
class Operation:
    name: str
    call: Call  # memsvc
    response_type: type[Message]
    matches: int  # episodes the operation's query selects


@dataclass(frozen=True)
class Sample:
    """One measurement of one operation on one target in one run."""

    run: int
    op: str
    target: str  # memsvc or echo
    calls: int
    p50_ms: float
    p99_ms: float
    response_bytes: int
    results: int  # episodes in the response
    server_cpu_us: float  # per call
    postgres_cpu_us: float  # per call; 0 for echo
    client_cpu_us: float


def _results(response: Message) -> int:
    if isinstance(response, pb.ListEpisodesResponse):
        return len(response.episodes)
    if isinstance(response, pb.SearchEpisodesResponse):
        return len(response.results)
    raise TypeError(type(response))


def operations(
    stub: EpisodicMemoryServiceStub, project_id: str, page_size: int, corpus: Corpus
) -> list[Operation]:
    list_request = pb.ListEpisodesRequest(project_id=project_id, page_size=page_size)

    def search(term: str) -> pb.SearchEpisodesRequest:
        return pb.SearchEpisodesRequest(project_id=project_id, query=term, page_size=page_size)

    selective, broad = search(SELECTIVE_TERM), search(BROAD_TERM)
    return [
        Operation(
            "List",
            lambda: stub.ListEpisodes(list_request),
            pb.ListEpisodesResponse,
            corpus.episodes,
        ),
        Operation(
            "Search selective",
            lambda: stub.SearchEpisodes(selective),
            pb.SearchEpisodesResponse,
            len(corpus.selective),
        ),
        Operation(
            "Search broad",
            lambda: stub.SearchEpisodes(broad),
            pb.SearchEpisodesResponse,
            len(corpus.broad),
        ),
    ]


@dataclass
class Meter:
    """The processes whose CPU time a measurement reads."""

    server_pid: int
    postgres: list[int] = field(default_factory=list)

    def read(self) -> tuple[int, int, int]:
        return time.process_time_ns(), cpu_ns(self.server_pid), _postgres_cpu_ns(self.postgres)


async def _measure(
    run: int, op: str, target: str, call: Call, meter: Meter, seconds: float
) -> Sample:
    response = await call()
    await _drive(call, 1, WARMUP_SECONDS)
    before = meter.read()
    latencies, made = await _drive(call, 1, seconds)
    after = meter.read()
    client_ns, server_ns, postgres_ns = (a - b for a, b in zip(after, before, strict=True))
    p50, p99 = _percentiles_ms(latencies)
    made = max(made, 1)
    return Sample(
        run=run,
        op=op,
        target=target,
        calls=len(latencies),
        p50_ms=p50,
        p99_ms=p99,
        response_bytes=response.ByteSize(),
        results=_results(response),
        server_cpu_us=server_ns / 1e3 / made,
        postgres_cpu_us=postgres_ns / 1e3 / made,
        client_cpu_us=client_ns / 1e3 / made,
    )


async def measure_reads(
    args: argparse.Namespace,
    memsvc: Target,
    echo: Target,
    memsvc_channel: grpc.aio.Channel,
    echo_channel: grpc.aio.Channel,
    corpus: Corpus,
    project_id: str,
    database_url: str,
) -> list[Sample]:
    stub = EpisodicMemoryServiceStub(memsvc_channel)
    load_echo = echo_channel.unary_unary(
        LOAD_METHOD, request_serializer=identity, response_deserializer=identity
    )
    memsvc_meter = Meter(memsvc.pid)
    echo_meter = Meter(echo.pid)
    samples: list[Sample] = []
    for run in range(1, args.runs + 1):
        for operation in operations(stub, project_id, args.page_size, corpus):
            # The echo answers with the bytes memsvc answers, parsed the same way.
            await load_echo((await operation.call()).SerializeToString())
            memsvc_meter.postgres = postgres_pids([database_url])
            measured = await _measure(
                run, operation.name, "memsvc", operation.call, memsvc_meter, args.seconds
            )
            echo_call: Call = _echo_call(echo_channel, operation.response_type)
            baseline = await _measure(
                run, operation.name, "echo", echo_call, echo_meter, args.seconds
            )
            if baseline.response_bytes != measured.response_bytes:
                raise RuntimeError(f"{operation.name}: echo answer differs from memsvc's")
            samples += [measured, baseline]
            for sample in (measured, baseline):
                print(
                    f"run {run} {sample.op:16} {sample.target:6} {sample.calls:6,} calls  "
                    f"p50 {sample.p50_ms:7.2f} ms  p99 {sample.p99_ms:7.2f} ms  "
                    f"{sample.response_bytes:,} bytes, {sample.results} results  "
                    f"server {sample.server_cpu_us:,.0f} µs/call, "
                    f"PostgreSQL {sample.postgres_cpu_us:,.0f} µs/call",
                    file=sys.stderr,
                )
    return samples


def _echo_call(channel: grpc.aio.Channel, response_type: type[Message]) -> Call:
    method = channel.unary_unary(
        RESUME_METHOD, request_serializer=identity, response_deserializer=response_type.FromString
    )

    async def call() -> Message:
        response: Message = await method(SMALL)
        return response

    return call


async def _run(
    args: argparse.Namespace,
    memsvc: Target,
    echo: Target,
    corpus: Corpus,
    project_id: str,
    database_url: str,
) -> tuple[LoadResult, list[Sample]]:
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{memsvc.port}") as memsvc_channel,
        grpc.aio.insecure_channel(
            f"127.0.0.1:{echo.port}", options=CHANNEL_OPTIONS
        ) as echo_channel,
    ):
        loaded = await load(args, memsvc, memsvc_channel, corpus, project_id, database_url)
        samples = await measure_reads(
            args, memsvc, echo, memsvc_channel, echo_channel, corpus, project_id, database_url
        )
    return loaded, samples


# --- summary -------------------------------------------------------------------------


def summarize(samples: list[Sample], corpus: Corpus) -> list[dict[str, Any]]:
    """Per operation: medians over the runs; memsvc / echo p50 within each run."""
    by_key = {(s.run, s.op, s.target): s for s in samples}
    matches = {"List": corpus.episodes}
    matches |= {"Search selective": len(corpus.selective), "Search broad": len(corpus.broad)}
    rows: list[dict[str, Any]] = []
    for op in OPS:
        memsvc = [s for s in samples if s.op == op and s.target == "memsvc"]
        echo = [by_key[s.run, op, "echo"] for s in memsvc]
        ratios = [m.p50_ms / e.p50_ms for m, e in zip(memsvc, echo, strict=True)]
        rows.append(
            {
                "op": op,
                "matches": matches[op],
                "results": memsvc[0].results,
                "response_bytes": memsvc[0].response_bytes,
                "runs": len(memsvc),
                "calls": _median([float(s.calls) for s in memsvc]),
                "p50_ms": _median([s.p50_ms for s in memsvc]),
                "p99_ms": _median([s.p99_ms for s in memsvc]),
                "echo_p50_ms": _median([s.p50_ms for s in echo]),
                "echo_p99_ms": _median([s.p99_ms for s in echo]),
                "ratio": _median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "server_cpu_us": _median([s.server_cpu_us for s in memsvc]),
                "postgres_cpu_us": _median([s.postgres_cpu_us for s in memsvc]),
                "echo_server_cpu_us": _median([s.server_cpu_us for s in echo]),
            }
        )
    return rows


def _ms(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def markdown_tables(
    loaded: LoadResult, rows: list[dict[str, Any]], args: argparse.Namespace
) -> str:
    lines = [
        "| Load | Episodes | Callers | Episodes/s | p50 (ms) | p99 (ms) "
        "| Server CPU (µs/episode) | PostgreSQL CPU (µs/episode) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
        f"| RecordEpisode | {loaded.episodes:,} | {args.concurrency} "
        f"| {loaded.episodes_per_s:,.0f} | {_ms(loaded.p50_ms)} | {_ms(loaded.p99_ms)} "
        f"| {loaded.server_cpu_us:,.0f} | {loaded.postgres_cpu_us:,.0f} |",
        "",
        "| Op | Matching episodes | Results | Response (bytes) | memsvc p50 (ms) "
        "| memsvc p99 (ms) | echo p50 (ms) | echo p99 (ms) | memsvc / echo p50 (range) "
        "| Server CPU (µs/call) | PostgreSQL CPU (µs/call) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['matches']:,} | {r['results']} | {r['response_bytes']:,} "
            f"| {_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} | {_ms(r['echo_p50_ms'])} "
            f"| {_ms(r['echo_p99_ms'])} "
            f"| {r['ratio']:.1f}x ({r['ratio_min']:.1f}-{r['ratio_max']:.1f}) "
            f"| {r['server_cpu_us']:,.0f} | {r['postgres_cpu_us']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def verdict(rows: list[dict[str, Any]]) -> str:
    p50 = {r["op"]: r["p50_ms"] for r in rows}
    runs = rows[0]["runs"] if rows else 0
    parts = []
    for op, limit in (
        ("List", LIST_P50_TARGET_MS),
        ("Search selective", SELECTIVE_SEARCH_P50_TARGET_MS),
    ):
        met = "met" if p50[op] < limit else "NOT met"
        parts.append(f"{op} p50 {p50[op]:.2f} ms (< {limit:.0f} ms: {met})")
    return f"Targets, medians of {runs} run(s): " + "; ".join(parts)


# --- main ----------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--episodes", type=int, default=100_000, help="episodes recorded")
    parser.add_argument("--agents", type=int, default=100, help="agent instances")
    parser.add_argument("--concurrency", type=int, default=16, help="RecordEpisode calls in flight")
    parser.add_argument(
        "--dims",
        type=int,
        default=0,
        help="embedding dimensions of every other episode (default 0: no embeddings)",
    )
    parser.add_argument("--runs", type=int, default=3, help="read measurements (median shown)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per figure")
    parser.add_argument("--page-size", type=int, default=20, help="List and Search page size")
    parser.add_argument(
        "--no-vacuum", action="store_true", help="no VACUUM (ANALYZE) between load and reads"
    )
    parser.add_argument(
        "--git-ref",
        default="",
        help="run memsvc as committed at this git ref (e.g. HEAD) instead of the work tree",
    )
    args = parser.parse_args(argv)
    if args.episodes < 100 or args.agents < 1 or args.concurrency < 1 or args.runs < 1:
        parser.error("needs at least 100 episodes, 1 agent, 1 caller and 1 run")
    return args


@contextlib.contextmanager
def _servers(
    args: argparse.Namespace, workdir: Path, database_url: str
) -> Iterator[tuple[Target, Target]]:
    with contextlib.ExitStack() as stack:
        port = free_port()
        data_dir = workdir / "memsvc"
        data_dir.mkdir()
        command = [str(MEMSVC)]
        if args.git_ref:
            command = _memsvc_at(args.git_ref, workdir / "source")
        memsvc_argv = [
            *command, "serve", "--health-listen=", "--metrics-listen=",
            "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir),
            "--working-memory-url", REDIS_URL, "--database-url", database_url,
        ]  # fmt: skip
        memsvc = stack.enter_context(_server("memsvc", memsvc_argv, workdir, port))
        echo_port = free_port()
        echo_argv = [sys.executable, "-m", "bench._lifecycle_echo", str(echo_port)]
        echo = stack.enter_context(_server("echo", echo_argv, workdir, echo_port))
        yield memsvc, echo


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    command = shlex.join(
        [".venv/bin/python", "-m", "bench.episodic", *(sys.argv[1:] if argv is None else argv)]
    )
    try:
        require_backend(REDIS_URL)
        require_backend(POSTGRES_ADMIN_URL)
    except BackendUnreachable as error:
        print(f"{error}; the episodic benchmark needs Redis and PostgreSQL", file=sys.stderr)
        return 2
    corpus = Corpus.make(args.episodes, args.agents)
    project_id = str(uuid.uuid4())
    started = datetime.now(UTC)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="memsvc-bench-")))
        database_url = stack.enter_context(_database("memsvc_bench_episodic"))
        # Registered before the server starts, so it runs after the server has stopped.
        stack.callback(_delete_redis_keys, project_id)
        memsvc, echo = stack.enter_context(_servers(args, workdir, database_url))
        loaded, samples = asyncio.run(_run(args, memsvc, echo, corpus, project_id, database_url))
    rows = summarize(samples, corpus)
    tables = markdown_tables(loaded, rows, args)
    described = _git_describe(args.git_ref)
    print(f"command: {command}")
    print(
        f"memsvc {described}; {args.episodes:,} episodes, {args.agents} agents, page size "
        f"{args.page_size}, {args.seconds:g} s per figure, medians of {args.runs} run(s)"
    )
    print()
    print(tables)
    print(verdict(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "started": started.isoformat(timespec="seconds"),
        "command": command,
        "memsvc": described,
        "machine": machine(),
        "settings": vars(args)
        | {
            "warmup_seconds": WARMUP_SECONDS,
            "selective_term": SELECTIVE_TERM,
            "broad_term": BROAD_TERM,
            "seed": SEED,
        },
        "load": asdict(loaded),
        "summary": rows,
        "samples": [asdict(sample) for sample in samples],
        "tables": tables,
    }
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(f"JSON results: {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
