"""The image's install steps, performed for real in a fresh venv, then the service run.

No Docker engine is needed: the steps come from deploy/Dockerfile itself (read by
tests/deploy/dockerfile.py), so this test cannot drift from it. The builder stage's ENV,
WORKDIR, COPY (through Dockerfile.dockerignore) and RUN instructions are carried out with
the image's directories moved under a temporary root; any RUN command the reader does not
know fails the test rather than being skipped. Then the runtime stage's ENV, ENTRYPOINT
and CMD start ``memsvc serve`` from that venv on free loopback ports, the API, the probe
port, the metrics port, the Unix socket and the image's HEALTHCHECK are asked, and
SIGTERM must end it with status 0.

The install takes about 20 s here (wheels from PyPI and the local mirror); the limit
below leaves room for a slow index.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memsvc.testing import free_port
from memsvc.v1 import lifecycle_pb2, lifecycle_pb2_grpc
from tests.deploy import dockerfile
from tests.deploy.support import DOCKERIGNORE, ROOT, parsed_dockerfile

pytestmark = pytest.mark.timeout(300)

INSTALL_TIMEOUT = 240.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
# The host's environment, less what would change how memsvc or Python behave: the
# MEMSVC_* settings and Python variables come from the Dockerfile alone.
_HOST_ENV = {
    key: value
    for key, value in os.environ.items()
    if not key.startswith(("MEMSVC_", "VIRTUAL_ENV", "PYTHON"))
}


@dataclass
class Image:
    """The image's filesystem laid out under ``root``, and what its last stage declares."""

    root: Path
    image_dirs: set[str] = field(default_factory=set)
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def rebase(self, value: str) -> str:
        """An image path (or a PATH-like list of them) moved under ``root``."""
        if not value.startswith("/"):
            return value
        parts = []
        for part in value.split(":"):
            if any(part == d or part.startswith(d.rstrip("/") + "/") for d in self.image_dirs):
                part = str(self.root / part.lstrip("/"))
            parts.append(part)
        return ":".join(parts)

    def which(self, name: str) -> str:
        """A command as the image's PATH finds it (the venv's before the system's)."""
        if name.startswith("/"):
            return self.rebase(name)
        found = shutil.which(name, path=self.env["PATH"])
        assert found is not None, f"{name} is not on the image's PATH {self.env['PATH']}"
        return found

    @property
    def venv(self) -> Path:
        return Path(self.env["VIRTUAL_ENV"])


def _image_dirs(parsed: dockerfile.Dockerfile) -> set[str]:
    """Directories that exist only inside the image: venvs, WORKDIRs, COPY targets."""
    dirs: set[str] = set()
    for stage in parsed.stages:
        dirs.update(i.text for i in stage.all("WORKDIR"))
        dirs.update(v for k, v in stage.env().items() if k == "VIRTUAL_ENV")
        for copy in stage.all("COPY"):
            dest = copy.options()[1].split()[-1]
            if dest.startswith("/"):
                dirs.add(dest)
    return dirs


def _apply_env(image: Image, instruction: dockerfile.Instruction) -> None:
    for key, value in instruction.pairs().items():
        image.env[key] = image.rebase(dockerfile.expand(value, image.env))


def _apply_workdir(image: Image, instruction: dockerfile.Instruction) -> None:
    path = Path(image.rebase(dockerfile.expand(instruction.text, image.env)))
    path.mkdir(parents=True, exist_ok=True)
    image.workdir = path


def _apply_copy(image: Image, instruction: dockerfile.Instruction) -> None:
    options, spec = instruction.options()
    *sources, dest = spec.split()
    if "from" in options:
        # COPY --from=builder /opt/memsvc /opt/memsvc: the same place under root already.
        assert sources == [dest], f"line {instruction.line}: --from copies to the same path"
        assert Path(image.rebase(dest)).is_dir(), f"line {instruction.line}: {dest} not built"
        return
    if dest.startswith("/"):
        target = Path(image.rebase(dest))
    else:
        assert image.workdir is not None, f"line {instruction.line}: relative COPY, no WORKDIR"
        target = image.workdir / dest
    ignore = dockerfile.DockerIgnore.parse(DOCKERIGNORE)
    for source in sources:
        files = ignore.files(ROOT, source)
        assert files, f"line {instruction.line}: {source} sends nothing into the build"
        for file in files:
            if (ROOT / source).is_dir():
                out = target / file.relative_to(ROOT / source)
            elif dest.endswith("/"):
                out = target / file.name
            else:
                out = target
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, out)


def _apply_run(image: Image, instruction: dockerfile.Instruction) -> None:
    for words in dockerfile.shell_commands(instruction):
        argv = [dockerfile.expand(word, image.env) for word in words]
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable  # the image's CPython 3.11 here is the test's
        elif not argv[0].startswith(str(image.root)):
            pytest.fail(
                f"Dockerfile line {instruction.line}: {argv[0]!r} is not a step this test "
                "knows how to perform outside a container; teach tests/deploy about it"
            )
        started = time.monotonic()
        result = subprocess.run(
            argv,
            cwd=image.workdir,
            env=image.env,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
        image.timings[" ".join(words)] = time.monotonic() - started
        assert result.returncode == 0, (
            f"Dockerfile line {instruction.line}: {' '.join(argv)} failed\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )


def _build(root: Path) -> Image:
    parsed = parsed_dockerfile()
    image = Image(root=root, image_dirs=_image_dirs(parsed), env=dict(_HOST_ENV))
    steps = {"ENV": _apply_env, "WORKDIR": _apply_workdir, "COPY": _apply_copy, "RUN": _apply_run}
    for instruction in parsed.stage("builder").instructions:
        step = steps.get(instruction.keyword)
        if step is None:
            pytest.fail(
                f"Dockerfile line {instruction.line}: the builder's {instruction.keyword} is "
                "not something this test performs; teach tests/deploy about it"
            )
        step(image, instruction)
    # The runtime stage: its RUN lines create the user and folders (checked by
    # test_dockerfile.py); the venv is already in place; the rest is carried over.
    image.env = dict(_HOST_ENV)
    image.workdir = None
    for instruction in parsed.final.instructions:
        keyword = instruction.keyword
        if keyword == "ENV":
            _apply_env(image, instruction)
        elif keyword == "WORKDIR":
            _apply_workdir(image, instruction)
        elif keyword == "COPY":
            _apply_copy(image, instruction)
        elif keyword == "ENTRYPOINT":
            image.entrypoint = instruction.exec_form() or []
        elif keyword == "CMD":
            image.cmd = instruction.exec_form() or []
        elif keyword == "HEALTHCHECK":
            command = instruction.options()[1].partition(" ")[2]
            image.healthcheck = (
                dockerfile.Instruction("CMD", command, instruction.line).exec_form() or []
            )
        else:
            assert keyword in {"LABEL", "RUN", "USER", "EXPOSE", "STOPSIGNAL"}, keyword
    return image


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return _build(tmp_path_factory.mktemp("image") / "root")


def _health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
    status: int = reply.status
    return status


def test_the_image_venv_holds_the_server_and_no_dev_tools(image: Image):
    probe = (
        "import importlib.util as u, sys\n"
        "need = ['memsvc.server', 'grpc_health.v1.health', 'redis', 'psycopg', 'psycopg_pool',"
        " 'aiosqlite', 'numpy', 'prometheus_client']\n"
        "dev = ['pytest', 'mypy', 'ruff', 'grpc_tools', 'hypothesis', 'kubernetes_validate']\n"
        "missing = [m for m in need if u.find_spec(m) is None]\n"
        "present = [m for m in dev if u.find_spec(m) is not None]\n"
        "print(missing, present); sys.exit(bool(missing or present))\n"
    )
    python = image.venv / "bin" / "python"
    result = subprocess.run(
        [str(python), "-c", probe], env=image.env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # memsvc is installed into the venv (not run from the source tree): data files too.
    files = list((image.venv / "lib").glob("python3.*/site-packages/memsvc/store/**/*.sql"))
    assert files, "the migrations did not reach the installed package"
    print("install timings (s):", {k: round(v, 1) for k, v in image.timings.items()})


def test_the_installed_service_serves_and_stops_cleanly_on_sigterm(image: Image, tmp_path: Path):
    ports = {"api": free_port(), "health": free_port(), "metrics": free_port()}
    socket_path = tmp_path / "memsvc.sock"
    token = secrets.token_hex(32)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token}\n")
    env = dict(image.env)
    env.update(
        MEMSVC_LISTEN=f"127.0.0.1:{ports['api']}",
        MEMSVC_HEALTH_LISTEN=f"127.0.0.1:{ports['health']}",
        MEMSVC_METRICS_LISTEN=f"127.0.0.1:{ports['metrics']}",
        MEMSVC_UNIX_SOCKET=str(socket_path),
        MEMSVC_UNIX_SOCKET_GROUP=str(os.getegid()),
        MEMSVC_AUTH_TOKENS_FILE=str(tokens),
        MEMSVC_SHUTDOWN_GRACE_SECONDS="5",
    )
    assert Path(env["MEMSVC_DATA_DIR"]).is_relative_to(image.root)
    argv = [image.which(image.entrypoint[0]), *image.entrypoint[1:], *image.cmd]
    log = tmp_path / "memsvc.log"
    with log.open("w") as out:
        process = subprocess.Popen(argv, cwd=image.workdir, env=env, stdout=out, stderr=out)
    try:
        _check_serving(process, ports, socket_path, log)
        _check_tokens(f"unix://{socket_path}", token)
        # The image's HEALTHCHECK, run as Docker would (with the image's PATH and env).
        check = [
            image.which(image.healthcheck[0]),
            *(image.rebase(a) for a in image.healthcheck[1:]),
        ]
        result = subprocess.run(
            check, env=env, capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_TIMEOUT) == 0, log.read_text()
        print(f"stopped {time.monotonic() - started:.2f} s after SIGTERM")
        assert not socket_path.exists(), "the Unix socket outlived the process"
    finally:
        _kill(process)


def _check_serving(
    process: subprocess.Popen[bytes], ports: dict[str, int], socket_path: Path, log: Path
) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    api = f"127.0.0.1:{ports['api']}"
    started = time.monotonic()
    deadline = started + START_TIMEOUT
    while True:
        assert process.poll() is None, (
            f"memsvc exited with {process.returncode}:\n{log.read_text()}"
        )
        try:
            if _health(api, "") == serving:
                break
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, (
            f"no SERVING within {START_TIMEOUT}s:\n{log.read_text()}"
        )
        time.sleep(0.1)
    print(f"API SERVING {time.monotonic() - started:.2f} s after start")
    assert _health(f"unix://{socket_path}", "") == serving
    probe = f"127.0.0.1:{ports['health']}"
    assert _health(probe, "liveness") == serving
    assert _health(probe, "readiness") == serving
    url = f"http://127.0.0.1:{ports['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert "# TYPE" in response.read().decode()


def _check_tokens(target: str, token: str) -> None:
    """The API wants the token (health, above, did not)."""
    request = lifecycle_pb2.ListSessionsRequest(project_id="0f8fad5b-d9cb-469f-a165-70867728950e")
    with grpc.insecure_channel(target) as channel:
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListSessions(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stub.ListSessions(request, timeout=5, metadata=(("authorization", f"Bearer {token}"),))


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)
