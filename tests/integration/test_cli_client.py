"""The operator commands of `memsvc`, run as a user would, against a real server."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2

from memsvc.server import Server
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub

MEMSVC = str(Path(sys.executable).parent / "memsvc")


class Cli:
    """Runs `memsvc ...` against one server (without blocking the server's loop)."""

    def __init__(self, server: Server, scope: dict[str, str]) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")}
        self.env["MEMSVC_ADDRESS"] = f"127.0.0.1:{server.port}"
        self.ids = ["-p", scope["project_id"], "-a", scope["agent_instance_id"],
                    "-s", scope["session_id"]]  # fmt: skip

    async def run(self, *args: str, timeout: float = 30) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            MEMSVC, *args, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), timeout)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    async def ok(self, *args: str) -> str:
        code, out, err = await self.run(*args)
        assert code == 0, f"memsvc {' '.join(args)} exited {code}: {err}"
        return out

    async def json(self, *args: str) -> Any:
        return json.loads(await self.ok(*args, "--json"))


@pytest.fixture
def cli(server: Server, scope: dict[str, str]) -> Cli:
    return Cli(server, scope)


async def test_a_session_from_spawn_to_episode(cli: Cli, scope: dict[str, str]):
    spawned = await cli.json("spawn", *cli.ids, "--set", 'plan={"steps": ["a", "b"]}')
    assert spawned["state"] == "active"
    await cli.ok("set", *cli.ids, "notes", '["found 3 papers"]', "--ttl", "3600")
    await cli.ok("set", *cli.ids, "mood", "curious")  # a bare word is a string
    assert json.loads(await cli.ok("get", *cli.ids, "plan")) == {"steps": ["a", "b"]}
    assert json.loads(await cli.ok("get", *cli.ids, "mood")) == "curious"

    paused = await cli.json("pause", *cli.ids, "--checkpoint-id", "before-review")
    assert paused["checkpoint"]["key_count"] == 3
    listed = await cli.json("checkpoints", "list", *cli.ids)
    assert [c["checkpoint_id"] for c in listed] == ["before-review"]
    resumed = await cli.ok("resume", *cli.ids)
    assert "before-review" in resumed and "3 entries" in resumed
    sessions = await cli.json("sessions", "list", "-p", scope["project_id"])
    assert [s["session_id"] for s in sessions] == [scope["session_id"]]

    ended = await cli.json(
        "terminate", *cli.ids, "--description", "Review the retry policy",
        "--outcome", "partial", "--lesson", "test the slow path",
    )  # fmt: skip
    assert ended["outcome"] == "partial" and ended["episode_id"]
    found = await cli.json("episodes", "search", "-p", scope["project_id"], "retry policy")
    assert [r["episode"]["episode_id"] for r in found] == [ended["episode_id"]]
    listed_episodes = await cli.json("episodes", "list", "-p", scope["project_id"])
    assert listed_episodes[0]["lessons_learned"] == ["test the slow path"]
    shown = await cli.json("sessions", "show", *cli.ids)
    assert shown["state"] == "terminated"


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("get", "KEY"), 3, "ERROR_REASON_KEY_NOT_FOUND"),
        (("pause",), 4, "ERROR_REASON_INVALID_TRANSITION"),
        (("spawn",), 4, "ERROR_REASON_SESSION_ALREADY_EXISTS"),
        (("resume", "--checkpoint-id", "nope"), 3, "ERROR_REASON_CHECKPOINT_NOT_FOUND"),
    ],
)
async def test_errors_have_clear_messages_and_exit_codes(
    cli: Cli, args: tuple[str, ...], code: int, says: str
):
    await cli.ok("spawn", *cli.ids)
    if args[0] == "pause":
        await cli.ok("pause", *cli.ids)
    command, *rest = args
    got, out, err = await cli.run(command, *cli.ids, *rest)
    assert (got, out) == (code, ""), err
    assert says in err


async def test_bad_input_and_an_unreachable_server(cli: Cli):
    code, _, err = await cli.run("sessions", "show", "-p", "nope", "-a", "x", "-s", "s")
    assert code == 2
    assert "project_id: must be a UUID" in err and "agent_instance_id" in err
    cli.env["MEMSVC_ADDRESS"] = "127.0.0.1:1"
    code, _, err = await cli.run("sessions", "list", "-p", "0f8fad5b-d9cb-469f-a165-70867728950e",
                                 "--timeout", "3")  # fmt: skip
    assert code == 5
    assert "UNAVAILABLE" in err and "is memsvc running at 127.0.0.1:1?" in err
    code, _, err = await cli.run("spawn", "-p", "x")  # missing required options
    assert code == 2 and "required" in err
    code, _, err = await cli.run("spawn", *cli.ids, "--set", "no-equals-sign")
    assert code == 2 and "KEY=JSON" in err
    code, _, err = await cli.run("set", *cli.ids, "k", "1", "--ttl", "nan")
    assert code == 2 and "finite" in err
    # Found by a review: 0 meant no expiry, and 1e20 a traceback.
    code, _, err = await cli.run("set", *cli.ids, "k", "1", "--ttl", "0")
    assert code == 2 and "more than 0" in err
    code, _, err = await cli.run("set", *cli.ids, "k", "1", "--ttl", "1e20")
    assert code == 2 and "at most" in err and "Traceback" not in err


async def test_watch_prints_events_live_and_resumes_from_a_cursor(cli: Cli):
    # From the oldest event: the project is the test's own, so whenever the watch
    # connects it sees exactly these three.
    watcher = asyncio.create_task(
        cli.run("watch", "-p", cli.ids[1], "--from-oldest", "--json", "--count", "3", timeout=60)
    )
    await cli.ok("spawn", *cli.ids)
    await cli.ok("pause", *cli.ids)
    await cli.ok("resume", *cli.ids)
    code, out, err = await watcher
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event_type"] for e in events] == [
        "session_spawned", "session_paused", "session_resumed",
    ]  # fmt: skip
    # Resuming after the first event's sequence prints the next two, in text form.
    after = str(events[0]["sequence"])
    code, out, err = await cli.run("watch", "-p", cli.ids[1], "--after", after, "--count", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == [f"#{e['sequence']}" for e in events[1:]]
    assert "session_paused" in lines[0] and "checkpoint=" in lines[0]
    # A session event's short name works as --type.
    code, out, err = await cli.run(
        "watch", "-p", cli.ids[1], "--after", after, "--type", "resumed", "--count", "1"
    )
    assert code == 0, err
    assert out.split()[0] == f"#{events[2]['sequence']}" and "session_resumed" in out


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("set", "IDS", "k", "NaN"), "not a JSON number"),
        (("set", "IDS", "k", "12345678901234567890123"), "2**53"),
        (("set", "IDS", "k", '{"a":'), "is not valid JSON"),
        (("spawn", "IDS", "--set", "k=Infinity"), "not a JSON number"),
        (("watch", "--type", "bogus"), "unknown event type 'bogus'"),
        (("watch", "--after", "-5"), "must be at least 0"),
        (("watch", "--count", "0"), "must be at least 1"),
        (("sessions", "list", "-p", "P", "--limit", "0"), "must be at least 1"),
        (("sessions", "list", "-p", "P", "--timeout", "0"), "more than 0 seconds"),
    ],
)
async def test_bad_command_lines_are_usage_errors_without_a_traceback(
    cli: Cli, args: tuple[str, ...], says: str
):
    """Refused before any call: exit code 2 and one clear line, never a traceback."""
    expanded = [a for arg in args for a in (cli.ids if arg == "IDS" else [arg])]
    expanded = [cli.ids[1] if arg == "P" else arg for arg in expanded]
    code, out, err = await cli.run(*expanded)
    assert (code, out) == (2, ""), err
    assert says in err and "Traceback" not in err


def strict_json(text: str) -> Any:
    """JSON as the standard has it: NaN and Infinity are not (json.loads takes them)."""

    def refuse(constant: str) -> Any:
        raise AssertionError(f"{constant} is not JSON: {text}")

    return json.loads(text, parse_constant=refuse)


async def test_numbers_json_cannot_carry_print_as_strings(
    cli: Cli, wm: WorkingMemoryServiceStub, scope: dict[str, str]
):
    """Found by a review: a NaN stored through raw gRPC (the API takes it) printed as
    NaN, which is not JSON: `get` and --json print protobuf's names as strings."""
    await cli.ok("spawn", *cli.ids)
    stored = struct_pb2.Value()
    stored.struct_value.fields["nan"].number_value = math.nan
    infinities = stored.struct_value.fields["limits"].list_value.values
    infinities.add().number_value = math.inf
    infinities.add().number_value = -math.inf
    stored.struct_value.fields["one"].number_value = 1.5
    ids: dict[str, Any] = dict(scope)
    await wm.Set(pb.SetRequest(**ids, key="odd", value=stored))
    await wm.Set(pb.SetRequest(**ids, key="nan", value=struct_pb2.Value(number_value=math.nan)))

    expected = {"nan": "NaN", "limits": ["Infinity", "-Infinity"], "one": 1.5}
    assert strict_json(await cli.ok("get", *cli.ids, "odd")) == expected
    assert strict_json(await cli.ok("get", *cli.ids, "odd", "--json"))["value"] == expected
    assert await cli.ok("get", *cli.ids, "nan") == '"NaN"\n'


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("get", "IDS", "\udcff"), "argument key is not valid UTF-8: \\xff"),
        (("set", "IDS", "k\udcff", "1"), "argument key is not valid UTF-8: k\\xff"),
        (("set", "IDS", "k", "\udcff"), "argument value is not valid UTF-8: \\xff"),
        (("sessions", "show", "-p", "P", "-a", "P", "-s", "r\udcffun"), "session is not valid"),
        (("watch", "-s", "\udcff"), "argument session is not valid UTF-8: \\xff"),
        (("terminate", "IDS", "--lesson", "\udcff"), "argument lesson is not valid UTF-8"),
        (("sessions", "list", "-p", "P", "--address", "\udcff"), "argument address is not"),
    ],
)
async def test_arguments_that_are_not_utf8_are_usage_errors(
    cli: Cli, args: tuple[str, ...], says: str
):
    """Found by a review: bytes that are not UTF-8 (here passed as the surrogates Python
    reads them as, which the subprocess turns back into bytes) printed a traceback
    and exited 1. Refused before any call: exit code 2 and one line."""
    expanded = [a for arg in args for a in (cli.ids if arg == "IDS" else [arg])]
    expanded = [cli.ids[1] if arg == "P" else arg for arg in expanded]
    code, out, err = await cli.run(*expanded)
    assert (code, out) == (2, ""), err
    assert says in err and len(err.splitlines()) == 1, err


async def test_a_non_utf8_address_variable_is_a_usage_error(cli: Cli):
    cli.env["MEMSVC_ADDRESS"] = "127.0.0.1:\udcff"
    code, out, err = await cli.run("sessions", "list", "-p", cli.ids[1])
    assert (code, out, err) == (
        2,
        "",
        "memsvc: $MEMSVC_ADDRESS is not valid UTF-8: 127.0.0.1:\\xff\n",
    )


async def test_tls_files_that_are_not_pem_are_usage_errors_at_once(cli: Cli, tmp_path: Path):
    """Found by a review: a token file given as --tls-ca made the CLI wait out its
    --timeout and blame an unreachable memsvc (exit code 5). Each TLS file is checked
    for a PEM block of its kind before any call: exit code 2, naming the file."""
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123456789abcdef\n")
    certificate = tmp_path / "client.crt"
    certificate.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nMIGH\n-----END PRIVATE KEY-----\n")
    listing = ["sessions", "list", "-p", cli.ids[1], "--timeout", "5"]
    cases = [
        (["--tls-ca", str(token)], f"the TLS CA file {token} holds no PEM certificate"),
        (["--tls-cert", str(key), "--tls-key", str(certificate)], f"certificate file {key}"),
        (["--tls-cert", str(certificate), "--tls-key", str(token)], f"key file {token} holds"),
    ]
    for flags, says in cases:
        code, out, err = await cli.run(*listing, *flags)
        assert (code, out) == (2, ""), err
        assert says in err and "Traceback" not in err
    # The variables are checked as the flags are.
    cli.env["MEMSVC_TLS_CA"] = str(token)
    code, _, err = await cli.run(*listing)
    assert code == 2 and f"the TLS CA file {token}" in err


async def test_a_listing_cut_by_its_limit_says_so(cli: Cli, scope: dict[str, str]):
    """Found by a review: `sessions list` stopped at 100 without a word, and passed
    for the whole list."""
    project, agent = scope["project_id"], scope["agent_instance_id"]
    for session in ("s1", "s2", "s3"):
        await cli.ok("spawn", "-p", project, "-a", agent, "-s", session)
    code, out, err = await cli.run("sessions", "list", "-p", project, "--limit", "2")
    assert code == 0 and len(out.splitlines()) == 2
    assert "showing the first 2; there are more (--limit)" in err
    code, out, err = await cli.run("sessions", "list", "-p", project, "--limit", "3")
    assert code == 0 and len(out.splitlines()) == 3 and err == ""
    code, out, err = await cli.run("sessions", "list", "-p", project, "--limit", "2", "--json")
    assert len(json.loads(out)) == 2 and "there are more" in err  # stdout stays JSON
