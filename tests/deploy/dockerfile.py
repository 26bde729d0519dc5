"""A small Dockerfile reader, so the tests follow deploy/Dockerfile instead of copying it.

It knows the subset deploy/Dockerfile uses: parser directives and comments, line
continuations, stages (``FROM image AS name``), ``KEY=VALUE`` ENV/ARG/LABEL, JSON
(exec) and shell forms, and ``--flag=value`` options of COPY, RUN and HEALTHCHECK.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

_CONTINUATION = re.compile(r"\\\s*$")
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True)
class Instruction:
    """One instruction: its keyword (upper case), its text, and the line it starts on."""

    keyword: str
    text: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The argument list of the JSON (exec) form, or None for the shell form."""
        text = self.text.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        if not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
            raise ValueError(f"line {self.line}: {self.keyword} is not a JSON list of strings")
        return [str(item) for item in value]

    def options(self) -> tuple[dict[str, str], str]:
        """Leading ``--name=value`` options and the rest of the text."""
        found: dict[str, str] = {}
        rest = self.text.strip()
        while rest.startswith("--"):
            word, _, rest = rest.partition(" ")
            name, _, value = word[2:].partition("=")
            found[name] = value
            rest = rest.lstrip()
        return found, rest

    def pairs(self) -> dict[str, str]:
        """``KEY=VALUE`` pairs (ENV, ARG, LABEL), quotes removed, values not expanded."""
        result: dict[str, str] = {}
        for word in shlex.split(self.text, posix=True):
            key, sep, value = word.partition("=")
            if not sep:
                raise ValueError(f"line {self.line}: {self.keyword} {word!r} is not KEY=VALUE")
            result[key] = value
        return result


@dataclass
class Stage:
    """The instructions from one FROM to the next."""

    base: str
    name: str | None
    index: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """The stage's ENV values in order; each may refer to earlier ones (``$VAR``)."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            values.update(instruction.pairs())
        return values


@dataclass
class Dockerfile:
    path: Path
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"{self.path} has no stage named {name!r}")

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Lines with continuations joined and comments dropped, with their first line number."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments may sit between continued lines, too
        if not pending:
            start = number
        if _CONTINUATION.search(raw):
            pending.append(_CONTINUATION.sub("", raw).strip())
            continue
        pending.append(stripped)
        yield start, " ".join(part for part in pending if part)
        pending = []
    if pending:
        raise ValueError("the Dockerfile ends inside a continued line")


def parse(path: Path) -> Dockerfile:
    stages: list[Stage] = []
    for line, text in _logical_lines(path.read_text()):
        keyword, _, rest = text.partition(" ")
        instruction = Instruction(keyword.upper(), rest.strip(), line)
        if instruction.keyword == "FROM":
            _, spec = instruction.options()
            words = spec.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, len(stages)))
        elif not stages:
            if instruction.keyword != "ARG":
                raise ValueError(f"line {line}: {instruction.keyword} before the first FROM")
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(path, stages)


def expand(text: str, env: Mapping[str, str]) -> str:
    """Replace ``$VAR`` and ``${VAR}`` with values from ``env`` (unknown: empty)."""
    return _VARIABLE.sub(lambda m: env.get(m.group(1) or m.group(2), ""), text)


def resolve_env(raw: Mapping[str, str], base: Mapping[str, str]) -> dict[str, str]:
    """ENV values in order, each expanded against ``base`` plus the ones before it."""
    env = dict(base)
    for key, value in raw.items():
        env[key] = expand(value, env)
    return env


def shell_commands(instruction: Instruction) -> list[list[str]]:
    """A shell-form RUN as its simple commands (split on ``&&``), unexpanded words."""
    if instruction.exec_form() is not None:
        return [instruction.exec_form() or []]
    _, script = instruction.options()
    commands: list[list[str]] = [[]]
    lexer = shlex.shlex(script, posix=True, punctuation_chars="&|;")
    lexer.whitespace_split = True
    for token in lexer:
        if token == "&&":
            commands.append([])
        elif token in {"|", "||", ";", "&"}:
            raise ValueError(
                f"line {instruction.line}: only '&&' chains are understood, found {token!r}"
            )
        else:
            commands[-1].append(token)
    return [command for command in commands if command]


def _pattern(glob: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regular expression."""
    out: list[str] = []
    index = 0
    while index < len(glob):
        char = glob[index]
        if glob.startswith("**", index):
            out.append(".*")
            index += 2
            if glob.startswith("/", index):
                out.append("/?")  # "**/x" also matches "x" at the top
                index += 1
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = glob.index("]", index)
            out.append("[" + glob[index + 1 : end].replace("!", "^", 1) + "]")
            index = end
        else:
            out.append(re.escape(char))
        index += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class DockerIgnore:
    """The rules of a .dockerignore file: the last rule matching a path (or a parent) wins."""

    rules: tuple[tuple[bool, re.Pattern[str]], ...]

    @classmethod
    def parse(cls, path: Path) -> DockerIgnore:
        rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keep = line.startswith("!")
            glob = line[1:].strip() if keep else line
            glob = glob.strip("/") or "."
            rules.append((keep, _pattern(glob)))
        return cls(tuple(rules))

    def sends(self, relative: str) -> bool:
        """Whether the file at this context-relative path reaches the builder."""
        parts = relative.strip("/").split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for keep, pattern in self.rules:
            if any(pattern.match(candidate) for candidate in candidates):
                excluded = not keep
        return not excluded

    def files(self, root: Path, source: str) -> list[Path]:
        """The files under ``root/source`` (a file or a folder) that reach the builder."""
        start = root / source
        paths = [start] if start.is_file() else sorted(p for p in start.rglob("*") if p.is_file())
        return [p for p in paths if self.sends(p.relative_to(root).as_posix())]
