"""deploy/Dockerfile: hadolint clean, and built the way docs/deployment.md says."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from memsvc import config
from tests.deploy import dockerfile
from tests.deploy.support import DOCKERFILE, DOCKERIGNORE, ROOT, load_healthcheck, require_tool
from tests.deploy.support import parsed_dockerfile as parsed


def test_hadolint_passes():
    hadolint = require_tool("hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_stages_use_the_same_pinned_slim_python_3_11():
    stages = parsed().stages
    assert [s.name for s in stages] == ["builder", None]
    # The runtime copies the builder's venv, whose python links to the base's interpreter.
    assert len({s.base for s in stages}) == 1
    base = stages[0].base
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), base


def test_the_builder_installs_the_server_extra_at_the_locked_versions():
    commands = [
        c for run in parsed().stage("builder").all("RUN") for c in dockerfile.shell_commands(run)
    ]
    installs = [c for c in commands if c[0].endswith("pip") and c[1] == "install"]
    assert len(installs) == 1, commands
    install = installs[0]
    assert install[install.index("-c") + 1] == "requirements.lock"
    assert install[-1] == ".[server]"
    assert "--no-cache-dir" in install


def test_the_runtime_stage_builds_nothing_and_runs_as_a_numeric_non_root_user():
    final = parsed().final
    for run in final.all("RUN"):
        for command in dockerfile.shell_commands(run):
            assert command[0] in {"groupadd", "useradd", "install"}, command
    copies = [copy.options() for copy in final.all("COPY")]
    assert (({"from": "builder"}, "/opt/memsvc /opt/memsvc")) in copies
    user = final.last("USER")
    assert user is not None
    uid, _, gid = user.text.partition(":")
    assert uid.isdigit() and int(uid) >= 10000 and gid.isdigit(), user.text
    env = final.env()
    assert env["MEMSVC_DATA_DIR"] == "/var/lib/memsvc"
    # The data directory belongs to that user.
    setup = " ".join(run.text for run in final.all("RUN"))
    assert f"install -d -o {uid} -g {gid}" in setup and "/var/lib/memsvc" in setup
    # Every MEMSVC_* the image sets is a setting memsvc knows (it refuses others).
    from memsvc.config import SETTINGS

    known = {setting.env for setting in SETTINGS}
    assert {name for name in env if name.startswith("MEMSVC_")} <= known


def test_entrypoint_cmd_ports_and_healthcheck():
    final = parsed().final
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint is not None and entrypoint.exec_form() == ["memsvc"]
    assert cmd is not None and cmd.exec_form() == ["serve"]
    expose = final.last("EXPOSE")
    assert expose is not None
    assert set(expose.text.split()) == {"50051", "8081", "9464"}
    # memsvc's own defaults are loopback; the image opens the probe and metrics ports
    # (neither serves memory) for the kubelet and scrapers outside the container.
    environment = " ".join(instruction.text for instruction in final.all("ENV")).split()
    assert {"MEMSVC_HEALTH_LISTEN=0.0.0.0:8081", "MEMSVC_METRICS_LISTEN=0.0.0.0:9464"} <= set(
        environment
    )
    healthcheck = final.last("HEALTHCHECK")
    assert healthcheck is not None
    options, rest = healthcheck.options()
    assert {"interval", "timeout", "start-period", "retries"} <= set(options)
    keyword, _, argv = rest.partition(" ")
    assert keyword == "CMD"
    command = dockerfile.Instruction("CMD", argv, healthcheck.line).exec_form()
    assert command is not None and command[0] == "python"
    # The script it runs is copied in from deploy/.
    copied = {
        dest: source
        for copy in final.all("COPY")
        if not copy.options()[0]
        for source, dest in [copy.options()[1].split()]
    }
    assert copied[command[1]] == "deploy/healthcheck.py"


def test_the_dockerignore_sends_every_copied_source_and_nothing_else():
    ignore = dockerfile.DockerIgnore.parse(DOCKERIGNORE)
    sources: list[str] = []
    for stage in parsed().stages:
        for copy in stage.all("COPY"):
            options, spec = copy.options()
            if "from" not in options:
                sources.extend(spec.split()[:-1])
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert ignore.files(ROOT, source), f"{source} is ignored by {DOCKERIGNORE.name}"
    kept_out = [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "deploy/Dockerfile",
        "memsvc/__pycache__/server.cpython-311.pyc",
        "bench/results/x.json",
    ]
    for path in kept_out:
        assert not ignore.sends(path), path
    assert ignore.sends("memsvc/store/postgres/migrations/0001_installation.sql")


@pytest.mark.parametrize(
    ("env", "service", "expected"),
    [
        ({}, "liveness", ("127.0.0.1:8081", "liveness")),
        ({"MEMSVC_HEALTH_LISTEN": "0.0.0.0:9000"}, "readiness", ("127.0.0.1:9000", "readiness")),
        ({"MEMSVC_HEALTH_LISTEN": "[::]:9000"}, "liveness", ("127.0.0.1:9000", "liveness")),
        ({"MEMSVC_HEALTH_LISTEN": "10.1.2.3:8081"}, "liveness", ("10.1.2.3:8081", "liveness")),
        # Probe port off: the API, which serves the same health services (a review
        # found it asked for "", which follows the backends, for liveness).
        ({"MEMSVC_HEALTH_LISTEN": ""}, "liveness", ("127.0.0.1:50051", "liveness")),
        (
            {"MEMSVC_HEALTH_LISTEN": "", "MEMSVC_LISTEN": "127.0.0.1:6000"},
            "readiness",
            ("127.0.0.1:6000", "readiness"),
        ),
    ],
)
def test_the_healthcheck_script_asks_what_memsvc_serves(
    env: dict[str, str], service: str, expected: tuple[str, str]
):
    assert load_healthcheck().target(service, env) == expected


def test_the_healthcheck_script_says_it_cannot_ask_a_tls_api(capsys):
    """Probe port off and TLS on: the check has no credentials for the API, and says
    so (it reported the container unhealthy for ever without a reason)."""
    env = {"MEMSVC_HEALTH_LISTEN": "", "MEMSVC_TLS_CERT_FILE": "/etc/memsvc/tls/tls.crt"}
    assert load_healthcheck().main(["liveness"], env) == 1
    assert "turn the probe port on" in capsys.readouterr().out


def test_the_healthcheck_script_fails_when_nothing_answers():
    from memsvc.testing import free_port

    module = load_healthcheck()
    assert module.main(["liveness", f"127.0.0.1:{free_port()}"], {}) == 1


def test_the_documented_docker_run_is_a_configuration_memsvc_accepts(tmp_path: Path) -> None:
    """docs/deployment.md's "try the image alone" command, with the image's own
    environment: memsvc must start with it, not refuse it (exit 2)."""
    docs = (ROOT / "docs" / "deployment.md").read_text()
    command = re.search(r"```sh\n(docker run .*?)\n```", docs, re.DOTALL)
    assert command is not None
    env = dict(re.findall(r"-e (MEMSVC_\w+)=(\S+)", command[1]))
    assert "MEMSVC_LISTEN" in env
    image_env = {
        name: value for name, value in parsed().final.env().items() if name.startswith("MEMSVC_")
    }
    loaded = config.load(env={**image_env, **env, "MEMSVC_DATA_DIR": str(tmp_path)})
    assert loaded.listen == env["MEMSVC_LISTEN"]
