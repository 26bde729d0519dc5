"""What a purge forgets is gone from the embedded database's files, not only from
its tables.

Found by a review: after a purge, the purged episodes' words stayed in SQLite's
full-text index (FTS5 deletes by adding markers; the old segments keep the
words until a merge), and the write-ahead log still held the deleted values.
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from pathlib import Path

import grpc
import pytest

from memsvc.config import Config
from memsvc.server import Server
from memsvc.v1 import data_removal_pb2 as dr
from memsvc.v1 import episodic_pb2 as ep
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.data_removal_pb2_grpc import DataRemovalServiceStub
from memsvc.v1.episodic_pb2_grpc import EpisodicMemoryServiceStub
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub

SECRET = "zqxwvplughsecret"  # one word, sharing no prefix with the others


def embedded_at(data_dir: Path) -> Config:
    """The embedded deployment (SQLite, working memory in process) in ``data_dir``."""
    return Config(listen="127.0.0.1:0", data_dir=str(data_dir), health_listen="", metrics_listen="")


def files_holding(data_dir: Path, needle: bytes) -> list[str]:
    return sorted(
        path.name
        for path in data_dir.iterdir()
        if path.name.startswith("memsvc.db") and needle in path.read_bytes()
    )


async def test_a_purged_episodes_words_leave_the_sqlite_files(tmp_path: Path):
    data_dir = tmp_path / "data"
    config = embedded_at(data_dir)
    project, agent = str(uuid.uuid4()), str(uuid.uuid4())
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        episodic = EpisodicMemoryServiceStub(channel)
        for index in range(3):
            await episodic.RecordEpisode(
                ep.RecordEpisodeRequest(
                    request_id=str(uuid.uuid4()),
                    episode=ep.Episode(
                        project_id=project,
                        agent_instance_id=agent,
                        session_id="s",
                        task_type="review",
                        outcome=lc.OUTCOME_SUCCESS,
                        task_description=f"{SECRET} {index}",
                        lessons_learned=[f"about {SECRET}"],
                    ),
                )
            )
        found = await episodic.SearchEpisodes(
            ep.SearchEpisodesRequest(project_id=project, query=SECRET)
        )
        assert len(found.results) == 3
        assert files_holding(data_dir, SECRET.encode())  # written, as a check of the check
        report = await DataRemovalServiceStub(channel).PurgeData(
            dr.PurgeDataRequest(project_id=project)
        )
        assert report.episodes_deleted == 3
        assert files_holding(data_dir, SECRET.encode()) == []


async def test_a_read_in_progress_leaves_the_log_for_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A reader that holds its snapshot (here another process's connection) keeps
    the checkpoint after a purge from emptying the log: the purge answers, and the
    log says the log is left to its next restart. (The checkpoint waits 200 ms for
    such reads, not busy_timeout's 5 s: not asserted, a test asserts no time.)"""
    data_dir = tmp_path / "data"
    config = embedded_at(data_dir)
    project = str(uuid.uuid4())
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        await LifecycleServiceStub(channel).Spawn(
            lc.SpawnRequest(project_id=project, agent_instance_id=project, session_id="s")
        )
        reader = sqlite3.connect(data_dir / "memsvc.db")
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM sessions").fetchone()  # holds a snapshot
            with caplog.at_level(logging.INFO, logger="memsvc.store.sqlite._store"):
                report = await DataRemovalServiceStub(channel).PurgeData(
                    dr.PurgeDataRequest(project_id=project), timeout=10
                )
            assert report.sessions_deleted == 1
            assert "a read in progress kept the write-ahead log" in caplog.text
        finally:
            reader.close()


async def test_words_of_an_episode_deleted_before_a_purge_leave_the_files_too(tmp_path: Path):
    """Found by a review: DeleteEpisode leaves the words in the index's segments
    (no merge per call), and a purge of their scope that deleted no episode itself
    left them there; the purge merges the index whatever it deletes."""
    data_dir = tmp_path / "data"
    config = embedded_at(data_dir)
    project = str(uuid.uuid4())
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        episodic = EpisodicMemoryServiceStub(channel)
        recorded = await episodic.RecordEpisode(
            ep.RecordEpisodeRequest(
                episode=ep.Episode(
                    project_id=project, agent_instance_id=str(uuid.uuid4()), session_id="s",
                    task_type="review", outcome=lc.OUTCOME_SUCCESS,
                    task_description=f"{SECRET} once",
                ),
            )
        )  # fmt: skip
        await episodic.DeleteEpisode(
            ep.DeleteEpisodeRequest(project_id=project, episode_id=recorded.episode.episode_id)
        )
        report = await DataRemovalServiceStub(channel).PurgeData(
            dr.PurgeDataRequest(project_id=project)
        )
        assert report.episodes_deleted == 0
        assert files_holding(data_dir, SECRET.encode()) == []
