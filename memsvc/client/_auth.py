"""Credentials of the client: a bearer token (fixed, or from a file that may rotate) and TLS.

The token goes with every call as the metadata ``authorization: Bearer <token>``. A
token file (a Kubernetes Secret volume, say) is checked for changes at most once a
second and read again when it changed; a call refused with UNAUTHENTICATED reads it
again at once and, if the token changed, is retried with the new one. So a rotation
(new token added on the server, the file updated, old token removed) goes unnoticed.
"""

from __future__ import annotations

import os
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

Metadata = tuple[tuple[str, str], ...]

# Visible ASCII: what a gRPC metadata value may carry.
_VISIBLE = frozenset(range(0x21, 0x7F))

# The PEM blocks gRPC reads from the TLS files: certificates (under any label OpenSSL
# takes for one) and private keys (PKCS#8, RSA, EC...).
_CERTIFICATE = re.compile(rb"-----BEGIN (?:X509 |TRUSTED )?CERTIFICATE-----")
_PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")


def _check_token(token: str, where: str) -> str:
    token = token.strip()
    if not token or any(ord(c) not in _VISIBLE for c in token):
        raise ValueError(f"{where} must hold one token of visible ASCII characters, without spaces")
    return token


class BearerToken:
    """The token a client sends: ``token`` itself, or the content of ``file``.

    ``metadata()`` is what each call carries. With a file, it is read now (so a missing
    file fails at once), and again when its size, time or inode changes, at most once
    every ``check_interval`` seconds; a file that is briefly unreadable (a Secret being
    swapped) leaves the last token in use.
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        file: str | os.PathLike[str] | None = None,
        check_interval: float = 1.0,
    ) -> None:
        if (token is None) == (file is None):
            raise ValueError("give a token or a token file, not both")
        self.file = Path(file) if file is not None else None
        self.check_interval = check_interval
        self._signature: tuple[int, int, int, int] | None = None
        self._checked = 0.0
        if token is not None:
            self._set(_check_token(token, "token"))
        else:
            self._set(self._read())

    def _set(self, token: str) -> None:
        self._token = token
        self._metadata: Metadata = (("authorization", f"Bearer {token}"),)

    def _read(self) -> str:
        assert self.file is not None
        stat = os.stat(self.file)
        text = self.file.read_text(encoding="ascii", errors="replace")
        self._signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        self._checked = time.monotonic()
        return _check_token(text, f"the token file {self.file}")

    def metadata(self) -> Metadata:
        """The call metadata carrying the current token."""
        if self.file is not None and time.monotonic() - self._checked >= self.check_interval:
            self.refresh()
        return self._metadata

    def refresh(self) -> bool:
        """Read the token file now if it changed; True when the token changed."""
        if self.file is None:
            return False
        self._checked = time.monotonic()
        try:
            stat = os.stat(self.file)
            if (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns) == self._signature:
                return False
            token = self._read()
        except (OSError, ValueError):
            return False  # keep the last good token; the next check tries again
        if token == self._token:
            return False
        self._set(token)
        return True

    def __repr__(self) -> str:
        source = f"file={str(self.file)!r}" if self.file is not None else "token=<hidden>"
        return f"BearerToken({source})"


@dataclass(frozen=True)
class TLS:
    """TLS to memsvc: whom to trust, and for mutual TLS the client's certificate.

    Attributes:
        ca_file: PEM CA certificate(s) that signed the server's certificate (None: the
            system's trusted roots).
        cert_file: PEM client certificate (chain), for mutual TLS; with ``key_file``.
        key_file: PEM private key of ``cert_file``.
        server_name: the name to check the server's certificate against, when it is not
            the host of the target (say, dialling 10.0.0.7 with a certificate for
            ``memsvc.internal``).
    """

    ca_file: str | os.PathLike[str] | None = None
    cert_file: str | os.PathLike[str] | None = None
    key_file: str | os.PathLike[str] | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLS cert_file and key_file go together: give both or neither")

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The files read into gRPC channel credentials (read now, once).

        OSError when a file cannot be read; ValueError when one holds no PEM block of
        its kind (gRPC would take it, then fail every handshake: each call would wait
        out its deadline as if the server were down).
        """
        ca = _read_pem(self.ca_file, "CA", _CERTIFICATE, "CERTIFICATE") or _system_roots()
        chain = _read_pem(self.cert_file, "certificate", _CERTIFICATE, "CERTIFICATE")
        key = _read_pem(self.key_file, "key", _PRIVATE_KEY, "PRIVATE KEY")
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=chain
        )

    def channel_options(self) -> list[tuple[str, str]]:
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def _system_roots() -> bytes | None:
    """The system's trusted roots: the bundle OpenSSL reads (``SSL_CERT_FILE`` if set),
    None where there is none or ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`` names others.
    gRPC's Python package otherwise trusts the bundle it ships, never the system's:
    a private CA installed on the machine was not trusted."""
    if os.environ.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"):
        return None  # gRPC's own setting for its default roots: it reads that file
    bundle = ssl.get_default_verify_paths().cafile
    if bundle is None:
        return None
    try:
        return Path(bundle).read_bytes()
    except OSError:
        return None


def _read_pem(
    path: str | os.PathLike[str] | None, what: str, block: re.Pattern[bytes], label: str
) -> bytes | None:
    """The content of a TLS file (None for no file); ValueError without a ``block``."""
    if path is None:
        return None
    content = Path(path).read_bytes()
    if block.search(content) is None:
        raise ValueError(
            f"the TLS {what} file {os.fsdecode(path)} holds no PEM {label.lower()} "
            f"(a '-----BEGIN {label}-----' block)"
        )
    return content
