"""The README's "A first call" grpcurl examples work as written against `memsvc serve`.

The ```sh block is taken from README.md and run with bash, as a reader would paste
it, with two substitutions only: the address (a free port instead of 127.0.0.1:50051,
which may be taken) and `grpcurl` resolved to the one `make` installs in .venv/bin.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.polyglot.conftest import RunningMemsvc

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## A first call"
DOCUMENTED_ADDRESS = "127.0.0.1:50051"
VENV_BIN = Path(sys.executable).parent
BLOCK_TIMEOUT_SECONDS = 40.0


def first_call_block() -> str:
    """The first ```sh block of the README's "A first call" section."""
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else len(text)]
    match = re.search(r"^```sh\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    assert match, f'no ```sh block in the README section "{SECTION}"'
    return match.group(1)


def test_the_block_is_found_and_uses_the_documented_address() -> None:
    block = first_call_block()
    assert DOCUMENTED_ADDRESS in block
    assert "grpcurl" in block
    assert (VENV_BIN / "grpcurl").exists(), "make installs grpcurl in .venv/bin"


def test_readme_first_call_runs_against_memsvc_serve(embedded_memsvc: RunningMemsvc) -> None:
    script = first_call_block().replace(DOCUMENTED_ADDRESS, embedded_memsvc.address)
    # -e: the first command that fails stops the block with its status; -x: stderr then
    # shows which one it was; pipefail in case an example ever pipes.
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    # Twice on one server: a reader may paste it again (session ids are never reused).
    for _ in range(2):
        done = subprocess.run(
            ["bash", "-euxo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            env=env,
            timeout=BLOCK_TIMEOUT_SECONDS,
        )
        assert done.returncode == 0, (
            f"a README command failed ({done.returncode}):\n{done.stderr}\n"
            f"--- stdout ---\n{done.stdout}\n--- memsvc log ---\n{embedded_memsvc.log_tail()}"
        )
    # Each step printed what the README promises.
    out = done.stdout
    assert "memsvc.v1.WorkingMemoryService" in out  # list
    for state in ("SESSION_STATE_ACTIVE", "SESSION_STATE_PAUSED", "SESSION_STATE_TERMINATED"):
        assert state in out
    assert '"summarise"' in out  # Get returned the plan
    assert '"episode_id"' in out  # Terminate recorded an episode
    assert '"status": "SERVING"' in out  # health
    commands = [line for line in done.stderr.splitlines() if line.startswith("+ grpcurl")]
    assert len(commands) == first_call_block().count("grpcurl -plaintext")
