"""Bearer tokens and TLS certificates for tests (shared by the client, integration and
polyglot tests).

Certificates come from the ``openssl`` command: a CA, a server certificate for
``localhost`` and 127.0.0.1 and a client certificate, all signed by it, plus a second
CA nobody trusts. A missing ``openssl`` skips the tests that need it on a laptop and
fails them under CI=true, as a missing backend does.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import IN_CI


def new_token() -> str:
    """A random bearer token (64 hex digits), as `openssl rand -hex 32` makes."""
    return secrets.token_hex(32)


def write_tokens(path: Path, *lines: str) -> Path:
    """Write a tokens file atomically (a reader never sees half of it)."""
    staging = path.with_name(path.name + ".new")
    staging.write_text("".join(f"{line}\n" for line in lines))
    os.replace(staging, path)
    return path


def write_token(path: Path, token: str) -> Path:
    """A client's token file: the token alone."""
    path.write_text(token + "\n")
    return path


@dataclass(frozen=True)
class Pki:
    """PEM files in one folder."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.folder / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.folder / "client.key"

    @property
    def other_ca(self) -> Path:
        """A CA that signed none of the above."""
        return self.folder / "other-ca.crt"

    @property
    def other_client_cert(self) -> Path:
        """A client certificate the other CA signed."""
        return self.folder / "other-client.crt"

    @property
    def other_client_key(self) -> Path:
        return self.folder / "other-client.key"


def _openssl() -> str:
    found = shutil.which("openssl")
    if found is None:
        message = "openssl is not installed (the TLS tests make their certificates with it)"
        if IN_CI:
            pytest.fail(f"CI=true and a required tool is missing: {message}")
        pytest.skip(message)
    return found


def _run(openssl: str, *args: str, cwd: Path) -> None:
    done = subprocess.run(
        [openssl, *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, f"openssl {' '.join(args)}:\n{done.stderr}"


def _key_and_request(openssl: str, name: str, subject: str, cwd: Path) -> None:
    _run(openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
         cwd=cwd)  # fmt: skip


def _ca(openssl: str, name: str, cwd: Path) -> None:
    _run(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
         "-subj", f"/CN=memsvc test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=cwd)  # fmt: skip


def _sign(openssl: str, name: str, ca: str, extensions: str, cwd: Path) -> None:
    (cwd / f"{name}.ext").write_text(extensions)
    _run(openssl, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey",
         f"{ca}.key", "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
         "-extfile", f"{name}.ext", cwd=cwd)  # fmt: skip


SERVER_EXTENSIONS = (
    "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
    "extendedKeyUsage=serverAuth\n"
)
CLIENT_EXTENSIONS = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"


def make_pki(folder: Path) -> Pki:
    """A CA with a server and a client certificate, and another CA with a client one."""
    openssl = _openssl()
    folder.mkdir(parents=True, exist_ok=True)
    _ca(openssl, "ca", folder)
    _key_and_request(openssl, "server", "/CN=localhost", folder)
    _sign(openssl, "server", "ca", SERVER_EXTENSIONS, folder)
    _key_and_request(openssl, "client", "/CN=agent", folder)
    _sign(openssl, "client", "ca", CLIENT_EXTENSIONS, folder)
    _ca(openssl, "other-ca", folder)
    _key_and_request(openssl, "other-client", "/CN=intruder", folder)
    _sign(openssl, "other-client", "other-ca", CLIENT_EXTENSIONS, folder)
    return Pki(folder)


def renew_server_certificate(pki: Pki, subject: str = "/CN=localhost") -> None:
    """Replace the server's key and certificate with new ones (same CA), atomically."""
    openssl = _openssl()
    folder = pki.folder
    _key_and_request(openssl, "renewed", subject, folder)
    _sign(openssl, "renewed", "ca", SERVER_EXTENSIONS, folder)
    os.replace(folder / "renewed.key", pki.server_key)
    os.replace(folder / "renewed.crt", pki.server_cert)
