"""Credentials the server checks: bearer tokens from a file, and TLS certificate files.

Both are re-read when their files change, so tokens and certificates rotate without a
restart (the server polls them every ``auth_reload_interval_seconds`` and on SIGHUP).
A file that changes into something unreadable or invalid is refused with a warning and
the previous credentials stay in force. docs/security.md describes the formats.

The tokens file holds one token per line, optionally followed by the project ids it
is bound to::

    # comments and blank lines are ignored
    3f1c9e0b7d6a4c2e8b5f0a9d1e7c3b6a      # any project
    9b2d4f6a8c0e1a3b5d7f9e2c4a6b8d0f 0f8fad5b-d9cb-469f-a165-70867728950e
    5e8a1c3f7b9d2e4a6c8f0b1d3e5a7c9f 0f8fad5b-d9cb-469f-a165-70867728950e,7c9e6679-...

Only SHA-256 digests of the tokens are kept; a call's token is hashed and looked up
in a dict, so checking a call costs one hash and one lookup, and no comparison
depends on how much of a token an attacker guessed. Logs name a token by its
fingerprint (``sha256:`` and 12 hex digits of its digest), never by its value.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Visible ASCII (what a gRPC metadata value may carry), at least 16 characters.
MIN_TOKEN_LENGTH = 16
_TOKEN = re.compile(r"[\x21-\x7e]+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_UUID_LIST = re.compile(rf"{_UUID.pattern}(,{_UUID.pattern})*,?")
_BEARER = "bearer "
_COMMENT = re.compile(r"(^|\s)#.*$")
# Outside a comment, a line holds visible ASCII, spaces and tabs only. What else
# str.split() takes for a space or splitlines() for a line end (a lone CR, VT, FF,
# U+001C-U+001E, U+0085, U+2028...) cut a line in two without a word: a project id
# wrapped onto a line of its own became a token valid in every project.
_NOT_TOKEN_TEXT = re.compile(r"[^\x20-\x7e\t]")
# The same separators inside a comment: it would end there, its rest a line of its own.
_LINE_BREAK = re.compile(r"[\r\v\f\x1c-\x1e\x85\u2028\u2029]")
# The placeholder of deploy/kubernetes/overlays/example: a token anyone can read.
EXAMPLE_TOKEN = "example-only-change-me-agent-token"


class CredentialsError(ValueError):
    """A tokens or certificate file cannot be used; the message says which and why."""


def digest(token: str) -> bytes:
    """The SHA-256 digest a token is known by."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def fingerprint(token_digest: bytes) -> str:
    """A name for a token that is safe to log."""
    return "sha256:" + token_digest.hex()[:12]


@dataclass(frozen=True, slots=True)
class Grant:
    """What one token allows: every project (``projects`` None) or only those listed."""

    digest: bytes
    projects: frozenset[str] | None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.digest)

    def allows(self, project_id: str) -> bool:
        """Whether this token may act in ``project_id`` (compared lower-cased, as stored)."""
        return self.projects is None or project_id.lower() in self.projects


class TokenTable:
    """The valid tokens, by digest."""

    def __init__(
        self, grants: Mapping[bytes, Grant] | None = None, uuid_lines: tuple[int, ...] = ()
    ) -> None:
        self._grants: dict[bytes, Grant] = dict(grants or {})
        # The lines whose token is a UUID (see parse_tokens), for a warning.
        self.uuid_lines = uuid_lines

    def __len__(self) -> int:
        return len(self._grants)

    def __iter__(self) -> Iterator[Grant]:
        return iter(self._grants.values())

    def lookup(self, token: str) -> Grant | None:
        """The grant of ``token``, or None when it is not a valid token."""
        return self._grants.get(digest(token))

    def get(self, token_digest: bytes) -> Grant | None:
        return self._grants.get(token_digest)

    def authorize(self, metadata: Any) -> Grant | str:
        """The grant of the call whose invocation metadata this is, or why there is none.

        ``metadata`` is a sequence of (key, value) pairs, as gRPC gives them (keys
        lower-cased). Returns ``"missing"``, ``"malformed"`` or ``"unknown"`` when
        the call is not authenticated. More than one ``authorization`` is malformed:
        behind a proxy that adds its own instead of replacing the client's, which
        one counts must not depend on their order.
        """
        given = [value for key, value in metadata or () if key == "authorization"]
        if not given:
            return "missing"
        value = given[0]
        if len(given) > 1 or not isinstance(value, str) or value[:7].lower() != _BEARER:
            return "malformed"
        grant = self._grants.get(digest(value[7:].strip()))
        return "unknown" if grant is None else grant


def parse_tokens(text: str, source: str = "tokens file") -> TokenTable:
    """Parse a tokens file; CredentialsError names the line and what is wrong with it.

    Each line: ``TOKEN`` or ``TOKEN PROJECT_ID[,PROJECT_ID...]``. ``#`` at the start of
    a line or after a space starts a comment, which may hold any text. Lines end at
    LF (a CR before it is dropped).
    """
    grants: dict[bytes, Grant] = {}
    uuid_lines: list[int] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        where = f"{source}, line {number}"
        content = _COMMENT.sub("", line)
        odd = _NOT_TOKEN_TEXT.search(content) or _LINE_BREAK.search(line)
        if odd:
            raise CredentialsError(
                f"{where}: character U+{ord(odd.group()):04X}: outside a comment a line "
                "holds visible ASCII characters, spaces and tabs only, and no line holds a "
                "line or word separator, comments included (one line per token, its "
                "project ids on the same line)"
            )
        fields = content.split()
        if not fields:
            continue
        if len(fields) > 2:
            raise CredentialsError(
                f"{where}: expected `TOKEN` or `TOKEN PROJECT_ID[,PROJECT_ID...]` (project ids "
                "separated by commas, no spaces)"
            )
        token = fields[0]
        if not _TOKEN.fullmatch(token) or len(token) < MIN_TOKEN_LENGTH:
            raise CredentialsError(
                f"{where}: a token must be at least {MIN_TOKEN_LENGTH} visible ASCII characters "
                "(make one with `openssl rand -hex 32`)"
            )
        if len(fields) == 1 and _UUID_LIST.fullmatch(token):
            # What a line wrapped before its project ids leaves (indented or not): as
            # a token it would act in every project, and the token above it too.
            raise CredentialsError(
                f"{where}: project ids alone, which read as the end of the line above "
                "wrapped onto a line of its own (join them to it); a token that acts in "
                "every project must not be a UUID (make one with `openssl rand -hex 32`)"
            )
        if _UUID.fullmatch(token):
            uuid_lines.append(number)
        projects: frozenset[str] | None = None
        if len(fields) == 2:
            ids = fields[1].split(",")
            bad = [n for n, i in enumerate(ids, start=1) if not _UUID.fullmatch(i)]
            if bad:
                # Never echo the text: it could be a token written in the wrong place.
                raise CredentialsError(
                    f"{where}: project ids must be UUIDs separated by commas (item {bad[0]} "
                    "of the list is not)"
                )
            projects = frozenset(i.lower() for i in ids)
        token_digest = digest(token)
        if token_digest in grants:
            raise CredentialsError(f"{where}: the token of an earlier line appears again")
        grants[token_digest] = Grant(token_digest, projects)
    return TokenTable(grants, tuple(uuid_lines))


def _signature(paths: tuple[Path, ...]) -> tuple[tuple[int, int, int, int, int], ...]:
    """What changes when any of ``paths`` is rewritten or swapped (symlinks followed,
    as a Kubernetes Secret volume swaps its ``..data`` link)."""
    signature = []
    for path in paths:
        st = os.stat(path)
        signature.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(signature)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise CredentialsError(f"cannot read the {what} {path}: {error.strerror}") from error


Signature = tuple[tuple[int, int, int, int, int], ...]


class _WatchedFiles:
    """Files read together, and read again when any of them changes."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths
        self._signature: Signature | None = None
        self._last_error: str | None = None

    def signature(self) -> Signature:
        """The files' current signature; CredentialsError when one cannot be found."""
        try:
            return _signature(self.paths)
        except OSError as error:
            raise CredentialsError(f"cannot read {error.filename}: {error.strerror}") from error

    def changed(self) -> Signature | None:
        """The new signature when the files changed since they were last accepted."""
        try:
            signature = self.signature()
        except CredentialsError as error:
            self.refuse(error)
            return None
        if signature == self._signature:
            if self._last_error is not None:
                # Back to the files in force (a link that pointed elsewhere for a while).
                log.info("%s: the files in force are readable again", self.paths[0])
                self._last_error = None
            return None
        return signature

    def accept(self, signature: Signature) -> None:
        self._signature = signature
        self._last_error = None

    @property
    def refused(self) -> bool:
        """Whether the files as they are now were refused: what is in force is older,
        and a change they hold (a revocation too) is not."""
        return self._last_error is not None

    def refuse(self, error: CredentialsError) -> None:
        # Once per distinct problem: a broken file is polled every few seconds.
        message = str(error)
        if message != self._last_error:
            log.warning("%s; the credentials in force stay", message)
            self._last_error = message


def _read_tokens(path: Path) -> tuple[str, TokenTable]:
    """The tokens file's text and the tokens it holds."""
    data = _read(path, "tokens file")
    try:
        # UTF-8, for the comments (a BOM that an editor put first is dropped).
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise CredentialsError(f"{path}, line {line}: not UTF-8 text") from None
    return text, parse_tokens(text, str(path))


def _warn_of(table: TokenTable, path: Path) -> None:
    """What is wrong with tokens about to be in force: none at all; tokens that are
    UUIDs (project ids are no secret); the example deployment's public placeholder."""
    if not table:
        log.warning("the tokens file %s holds no token: every API call is refused", path)
    if table.uuid_lines:
        log.warning(
            "the tokens file %s holds tokens that are UUIDs (line %s), which look like "
            "project ids (no secret): make tokens with openssl rand -hex 32",
            path,
            ", ".join(map(str, table.uuid_lines)),
        )
    if table.lookup(EXAMPLE_TOKEN) is not None:
        log.warning(
            "the tokens file %s holds the example deployment's placeholder token, which "
            "anyone who has read memsvc's repository knows: replace it (openssl rand -hex 32)",
            path,
        )


def _unfinished_widening(text: str, old: TokenTable) -> bool:
    """Whether the file's last line has no end of line and holds a token alone that
    did not already act in every project: maybe a line cut before its project ids,
    in a file caught half written, which would widen the token to every project."""
    if text.endswith("\n"):
        return False
    fields = _COMMENT.sub("", text.rsplit("\n", 1)[-1]).split()
    if len(fields) != 1:
        return False
    grant = old.lookup(fields[0])
    return grant is None or grant.projects is not None


class _FromFiles:
    """Credentials read from files that are watched for changes (``_files``)."""

    _files: _WatchedFiles

    @property
    def refused(self) -> bool:
        """Whether the files were changed into ones that are refused (see _WatchedFiles)."""
        return self._files.refused


class TokenFile(_FromFiles):
    """The tokens file named by ``auth_tokens_file``; ``table`` is what calls are checked
    against. ``reload()`` reads it again if it changed (run it off the event loop)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        hold_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        # How long a file that may be cut mid-line must stay unchanged before it is
        # taken (the reload interval: a SIGHUP sent on every write must not cut it short).
        self._hold_seconds, self._clock = hold_seconds, clock
        self._files = _WatchedFiles(self.path)
        signature = self._files.signature()
        self.table = _read_tokens(self.path)[1]
        self._files.accept(signature)
        # The text of a file whose last line may be unfinished, held back, and since when.
        self._held: tuple[str, float] | None = None
        bound = sum(1 for grant in self.table if grant.projects is not None)
        log.info(
            "loaded %d token(s) from %s (%d bound to projects)", len(self.table), self.path, bound
        )
        _warn_of(self.table, self.path)

    def reload(self) -> TokenTable | None:
        """The new table when the file changed into a valid one (not yet in force:
        the caller assigns ``table``), else None."""
        signature = self._files.changed()
        if signature is None:
            return None
        try:
            text, table = _read_tokens(self.path)
            if self._files.signature() != signature:
                return None  # changed while being read: take it at the next check
        except CredentialsError as error:
            self._files.refuse(error)
            return None
        suspicion = self._suspicion(text, table)
        if suspicion:
            # Taken only once it has stayed so for a while: a writer that paused
            # mid-line, or truncated the file to write it again, has finished by then.
            now = self._clock()
            if self._held is None or self._held[0] != text:
                self._held = (text, now)
                log.warning(
                    "%s: %s: taken if unchanged in %g s", self.path, suspicion, self._hold_seconds
                )
                return None
            if now - self._held[1] < self._hold_seconds:
                return None
        self._held = None
        self._files.accept(signature)
        old = {grant.digest: grant for grant in self.table}
        new = {grant.digest: grant for grant in table}
        rebound = [
            f"{fingerprint(d)} to {_scope_of(grant)}"
            for d, grant in new.items()
            if d in old and old[d].projects != grant.projects
        ]
        log.info(
            "reloaded %s: %d token(s); added %s; removed %s; rebound %s",
            self.path,
            len(table),
            ", ".join(sorted(fingerprint(d) for d in new.keys() - old.keys())) or "none",
            ", ".join(sorted(fingerprint(d) for d in old.keys() - new.keys())) or "none",
            ", ".join(sorted(rebound)) or "none",
        )
        _warn_of(table, self.path)
        return table

    def _suspicion(self, text: str, table: TokenTable) -> str:
        """Why a changed file may be a writer's unfinished work ('' if it looks done)."""
        if _unfinished_widening(text, self.table):
            # (End the last line with a newline to never meet this: the check reads
            # the text, however it was written.)
            return "its last line has no end of line and lets its token act in every project"
        if not table and self.table:
            # Taken at once, it would refuse every call and end every watch.
            return "it holds no token any more, which refuses every API call (truncated?)"
        return ""


def _scope_of(grant: Grant) -> str:
    if grant.projects is None:
        return "every project"
    return f"{len(grant.projects)} project(s)"


@dataclass(frozen=True)
class Certificates:
    """The PEM contents of a server's TLS files."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def _check_certificates(cert_file: Path, key_file: Path, client_ca: bytes | None) -> None:
    """Refuse files TLS could not use: not PEM, a key that is not the certificate's,
    an encrypted key (gRPC takes none)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An empty password: an encrypted key fails here instead of prompting.
        context.load_cert_chain(cert_file, key_file, password="")
    except (ssl.SSLError, OSError) as error:
        raise CredentialsError(
            f"{cert_file} and {key_file} are not a PEM certificate and its unencrypted "
            f"private key: {error}"
        ) from error
    if client_ca is not None:
        try:
            # The certificates only: text around them may be anything (a comment
            # naming the CA's owner, as "Société Générale"), which gRPC skips, but
            # Python's ssl takes PEM as ASCII text only.
            blocks = _PEM_CERTIFICATE.findall(client_ca)
            if not blocks:
                raise ValueError("no -----BEGIN CERTIFICATE----- block")
            context.load_verify_locations(cadata=b"\n".join(blocks).decode("ascii"))
        except (ssl.SSLError, ValueError) as error:
            raise CredentialsError(
                f"the TLS client CA file holds no PEM certificate: {error}"
            ) from error


class CertificateFiles(_FromFiles):
    """The server's certificate, key and (for mutual TLS) client CA, from files.

    ``current`` holds the contents in force; ``reload()`` returns new contents when a
    file changed (the server hands them to gRPC for the next handshakes).
    """

    def __init__(
        self,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        client_ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.client_ca_file = Path(client_ca_file) if client_ca_file else None
        paths = (self.cert_file, self.key_file) + (
            (self.client_ca_file,) if self.client_ca_file else ()
        )
        self._files = _WatchedFiles(*paths)
        signature = self._files.signature()
        self.current = self._load()
        self._files.accept(signature)
        log.info("TLS certificate %s loaded", self.cert_file)

    def _load(self) -> Certificates:
        cert = _read(self.cert_file, "TLS certificate")
        key = _read(self.key_file, "TLS key")
        client_ca = None
        if self.client_ca_file is not None:
            client_ca = _read(self.client_ca_file, "TLS client CA")
        _check_certificates(self.cert_file, self.key_file, client_ca)
        return Certificates(cert, key, client_ca)

    def reload(self) -> Certificates | None:
        """The new contents when a file changed into a usable set, else None."""
        signature = self._files.changed()
        if signature is None:
            return None
        try:
            certificates = self._load()
            if self._files.signature() != signature:
                return None  # changed while being read: take it at the next check
        except CredentialsError as error:
            self._files.refuse(error)
            return None
        self._files.accept(signature)
        if certificates == self.current:
            return None
        self.current = certificates
        log.info("reloaded the TLS certificate %s", self.cert_file)
        return certificates
