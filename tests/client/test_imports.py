"""The SDK installs without the server's dependencies: prove it imports and runs without them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Server-only distributions (memsvc[server]) and memsvc's server-side modules.
BLOCKED = [
    "redis",
    "hiredis",
    "psycopg",
    "psycopg_pool",
    "psycopg_binary",
    "aiosqlite",
    "numpy",
    "tenacity",
    "sortedcontainers",
    "prometheus_client",
    "grpc_health",
    "grpc_reflection",
    "memsvc.domain",
    "memsvc.api",
    "memsvc.store",
    "memsvc.server",
    "memsvc.config",
    "memsvc.cli",
    "memsvc.log",
    "memsvc.failpoints",
    "memsvc.testing",
]

# Refuses the imports of BLOCKED: put first in every script below.
BLOCKER = textwrap.dedent(
    """
    import sys

    BLOCKED = {blocked!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"blocked import of {{name}} (a server dependency)")
            return None

    sys.meta_path.insert(0, Blocker())
    """
)

SCRIPT = BLOCKER + textwrap.dedent(
    """
    import asyncio

    import memsvc.client
    from memsvc.client import AsyncClient, Client, RetryPolicy

    async def use_async() -> None:
        async with AsyncClient("127.0.0.1:1", timeout=0.5, retry=RetryPolicy.disabled()) as c:
            s = c.session("0f8fad5b-d9cb-469f-a165-70867728950e",
                          "7c9e6679-7425-40de-944b-e07fc1f90ae7", "run-1")
            try:
                await s.get("k")
            except memsvc.client.Unavailable:
                pass
            c.watch("0f8fad5b-d9cb-469f-a165-70867728950e")

    asyncio.run(use_async())
    with Client("127.0.0.1:1") as sync_client:
        sync_client.session("p", "a", "s")

    loaded = sorted(
        name for name in sys.modules
        if any(name == b or name.startswith(b + ".") for b in BLOCKED)
    )
    assert not loaded, loaded
    print("ok", len(memsvc.client.__all__))
    """
)


def run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_sdk_needs_no_server_dependency():
    result = run(SCRIPT.format(blocked=BLOCKED))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_the_blocker_does_block():
    """The check above would catch a server import: the server itself fails under it."""
    script = SCRIPT.format(blocked=BLOCKED).replace(
        "import memsvc.client\n", "import memsvc.client\nimport memsvc.server\n", 1
    )
    result = run(script)
    assert result.returncode != 0
    assert "blocked import" in result.stderr


RUN_CLI = BLOCKER + textwrap.dedent(
    """
    from memsvc.cli import main

    sys.exit(main({argv!r}))
    """
)


def test_serve_and_migrate_without_the_server_extra_say_what_to_install(tmp_path):
    """Found by a review: on an install of the SDK alone (`pip install memsvc`), whose
    CLI lists serve and migrate, both died with a ModuleNotFoundError traceback."""
    distributions = [name for name in BLOCKED if not name.startswith("memsvc")]
    for command in ("serve", "migrate"):
        argv = [command, "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0"]
        result = run(RUN_CLI.format(blocked=distributions, argv=argv))
        assert result.returncode == 2, result.stderr
        assert f"memsvc {command} needs the server extra: pip install 'memsvc[server]'" in (
            result.stderr
        )
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "data").exists()


def test_the_cli_knows_every_module_of_the_server_extra():
    """SERVER_MODULES, which serve and migrate check, names a module of each of the
    server extra's distributions, and only of those."""
    import importlib.metadata
    import re
    import tomllib

    from memsvc.cli import SERVER_MODULES

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["server"]
    wanted = {re.split(r"[\[<>=!~ ]", requirement)[0].lower() for requirement in extra}
    owners = importlib.metadata.packages_distributions()
    covered = {
        dist.lower().replace("_", "-") for module in SERVER_MODULES for dist in owners[module]
    }
    assert covered == {name.replace("_", "-") for name in wanted}


def test_a_server_module_that_is_not_installed_is_missing(monkeypatch):
    """What an install of the SDK alone gives: no finder knows the module (find_spec
    answers None; the blocker above raises instead)."""
    from memsvc import cli

    monkeypatch.setattr(cli, "SERVER_MODULES", ("grpc", "memsvc_no_such_module"))
    assert cli._missing_server_modules() == ["memsvc_no_such_module"]
