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


def _listing_defaults() -> dict[str, int]:
    """The default --limit of each listing, as cli.md's paragraph on listings says."""
    text = DOCS.read_text()
    paragraph = text[text.index("- Listings (") :].split("\n- ")[0]
    first, best = paragraph.split(" by default, ")
    defaults = {
        name: int(re.findall(r"first (\d+)", first)[0])
        for name in re.findall(r"`([a-z ]+)`", first)
    }
    defaults.update(
        {
            name: int(re.findall(r"best (\d+)", best)[0])
            for name in re.findall(r"`([a-z ]+)`", best)[:1]
        }
    )
    return defaults


def test_the_listing_paragraph_names_listings() -> None:
    assert _listing_defaults() == {
        "sessions list": 100,
        "checkpoints list": 100,
        "graph list": 100,
        "episodes list": 100,
        "episodes search": 20,
    }


@pytest.mark.parametrize(("command", "default"), sorted(_listing_defaults().items()))
def test_each_listing_shows_what_cli_md_says_by_default(
    command: str, default: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by a review: `episodes list` showed 20, where cli.md said 100."""
    with pytest.raises(SystemExit):
        main([*command.split(), "--help"])
    assert f"(default: {default})" in " ".join(capsys.readouterr().out.split())
