"""docs/cli.md names only commands `memsvc` has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from memsvc.cli import main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def _retry_paragraph() -> str:
    text = DOCS.read_text()
    start = text.index("The SDK under the commands retries")
    return text[start:].split("\n\n")[0]


def _named_commands() -> list[str]:
    return re.findall(r"`([a-z]+(?: [a-z]+)?)`", _retry_paragraph())


def test_the_retry_paragraph_names_commands() -> None:
    assert "set" in _named_commands() and "graph prune" in _named_commands()


@pytest.mark.parametrize("command", _named_commands())
def test_each_command_the_retry_paragraph_names_exists(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by a review: it named a `delete` that `memsvc` refused as an invalid choice."""
    with pytest.raises(SystemExit) as exited:
        main([*command.split(), "--help"])
    assert exited.value.code == 0, capsys.readouterr().err
