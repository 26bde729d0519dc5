"""TLS and mutual TLS from certificate files: the SDK, raw gRPC and the CLI connect with
the right credentials and are refused without them; renewed certificates are served
without a restart; the probe port stays plaintext for the kubelet."""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memsvc.client import TLS, AsyncClient, RetryPolicy, Unauthenticated, Unavailable
from memsvc.config import Config
from memsvc.server import Server
from memsvc.v1 import lifecycle_pb2, lifecycle_pb2_grpc
from tests.client._credentials import (
    Pki,
    make_pki,
    new_token,
    renew_server_certificate,
    write_tokens,
)
from tests.conftest import DEPLOYMENTS, Deployment
from tests.helpers import eventually

MEMSVC = str(Path(sys.executable).parent / "memsvc")
PROJECT = "0f8fad5b-d9cb-469f-a165-70867728950e"
AGENT = "5a1f36a2-0c6f-4bb4-9d3e-2f1c3a9b8e70"
ONCE = RetryPolicy.disabled()


@pytest.fixture
def deployment() -> Deployment:
    return DEPLOYMENTS["embedded"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def own_pki(tmp_path: Path) -> Pki:
    """Certificates this test may replace."""
    return make_pki(tmp_path / "pki")


def tls_config(base: Config, pki: Pki, *, mutual: bool = False, **more: object) -> Config:
    return replace(
        base,
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca) if mutual else "",
        **more,  # type: ignore[arg-type]
    )


@pytest.fixture
async def tls_server(base_config: Config, pki: Pki) -> AsyncIterator[Server]:
    async with Server(tls_config(base_config, pki, health_listen="127.0.0.1:0")) as server:
        yield server


@pytest.fixture
async def mtls_server(base_config: Config, pki: Pki, tmp_path: Path) -> AsyncIterator[Server]:
    # A data directory of its own: a test may run it beside tls_server, and the
    # embedded deployment serves one directory from one process.
    own = tmp_path / "mtls"
    config = tls_config(base_config, pki, mutual=True, data_dir=str(own),
                        database_url=f"sqlite:///{own}/memsvc.db")  # fmt: skip
    async with Server(config) as server:
        yield server


def session_ids() -> tuple[str, str, str]:
    return PROJECT, AGENT, f"tls-{uuid.uuid4().hex[:8]}"


async def test_tls_serves_clients_that_trust_its_ca(tls_server: Server, pki: Pki):
    target = f"127.0.0.1:{tls_server.port}"
    async with AsyncClient(target, tls=TLS(ca_file=pki.ca), retry=ONCE) as client:
        session = await client.session(*session_ids()).spawn()
        assert session.version == 1
    # The certificate names localhost too.
    async with AsyncClient(
        f"localhost:{tls_server.port}", tls=TLS(ca_file=pki.ca), retry=ONCE
    ) as client:
        await client.session(*session_ids()).spawn()
    # A name the certificate does not carry, and a CA that did not sign it.
    for tls in (TLS(ca_file=pki.ca, server_name="elsewhere.example"), TLS(ca_file=pki.other_ca)):
        async with AsyncClient(target, tls=tls, retry=ONCE, timeout=5) as client:
            with pytest.raises(Unavailable):
                await client.session(*session_ids()).spawn()
    # Plaintext to a TLS port.
    async with AsyncClient(target, retry=ONCE, timeout=5) as client:
        with pytest.raises(Unavailable):
            await client.session(*session_ids()).spawn()


async def test_tls_without_a_ca_file_trusts_the_systems_roots(
    tls_server: Server, pki: Pki, monkeypatch: pytest.MonkeyPatch
):
    """``tls=True`` trusts the system's roots, here the bundle SSL_CERT_FILE names, as
    OpenSSL does. Found by a review: gRPC's Python package trusts only the bundle it
    ships, so a private CA installed on the machine was not trusted."""
    monkeypatch.delenv("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    async with AsyncClient(
        f"127.0.0.1:{tls_server.port}", tls=True, retry=ONCE, timeout=5
    ) as client:
        session = await client.session(*session_ids()).spawn()
        assert session.version == 1
    # gRPC's own setting for its default roots wins where it is set.
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.other_ca))
    monkeypatch.setenv("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", str(pki.ca))
    async with AsyncClient(
        f"127.0.0.1:{tls_server.port}", tls=True, retry=ONCE, timeout=5
    ) as client:
        await client.session(*session_ids()).spawn()


async def test_the_probe_port_stays_plaintext(tls_server: Server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tls_server.health_port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="liveness"), timeout=5
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_mutual_tls_needs_a_client_certificate_its_ca_signed(mtls_server: Server, pki: Pki):
    target = f"127.0.0.1:{mtls_server.port}"
    mutual = TLS(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    async with AsyncClient(target, tls=mutual, retry=ONCE) as client:
        await client.session(*session_ids()).spawn()
    without_cert = TLS(ca_file=pki.ca)
    stranger = TLS(ca_file=pki.ca, cert_file=pki.other_client_cert, key_file=pki.other_client_key)
    for tls in (without_cert, stranger):
        async with AsyncClient(target, tls=tls, retry=ONCE, timeout=5) as client:
            with pytest.raises(Unavailable):
                await client.session(*session_ids()).spawn()


async def test_a_client_ca_file_with_text_around_its_certificates_is_taken(
    base_config: Config, pki: Pki, tmp_path: Path
):
    """Found by a review: a comment outside the PEM block with one non-ASCII
    character ("Société Générale") stopped start-up with "holds no PEM
    certificate", though gRPC reads such a file."""
    commented = tmp_path / "ca-with-comment.pem"
    comment = "# Client CA for Société Générale agents\n".encode()
    commented.write_bytes(comment + pki.ca.read_bytes())
    own = tmp_path / "mtls"
    config = tls_config(base_config, pki, mutual=True, data_dir=str(own),
                        database_url=f"sqlite:///{own}/memsvc.db")  # fmt: skip
    config = replace(config, tls_client_ca_file=str(commented))
    async with Server(config) as server:
        mutual = TLS(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
        async with AsyncClient(f"127.0.0.1:{server.port}", tls=mutual, retry=ONCE) as client:
            await client.session(*session_ids()).spawn()


async def test_a_client_ca_taken_out_refuses_even_connected_clients(
    base_config: Config, own_pki: Pki, tmp_path: Path
):
    """Found by a review: a connection is admitted at its handshake, and one kept up
    by keepalive pings outlived the removal of its client's CA for good. Connections
    are made again every max_connection_age_seconds, so the removal reaches them."""
    bundle = tmp_path / "client-cas.pem"
    bundle.write_bytes(own_pki.ca.read_bytes() + own_pki.other_ca.read_bytes())
    config = tls_config(
        base_config, own_pki, mutual=True, auth_reload_interval_seconds=0.1,
        max_connection_age_seconds=1,
    )  # fmt: skip
    config = replace(config, tls_client_ca_file=str(bundle))
    stranger = TLS(
        ca_file=own_pki.ca, cert_file=own_pki.other_client_cert, key_file=own_pki.other_client_key
    )
    async with (
        Server(config) as server,
        AsyncClient(f"127.0.0.1:{server.port}", tls=stranger, retry=ONCE, timeout=5) as client,
    ):
        session = client.session(*session_ids())
        await session.spawn()
        bundle.write_bytes(own_pki.ca.read_bytes())  # the other CA taken out

        async def refused() -> bool:
            try:
                await session.describe()
            except Unavailable:
                return True
            return False

        await eventually(refused, timeout=20)  # before: admitted for as long as it ran


async def test_raw_grpc_with_mutual_tls(mtls_server: Server, pki: Pki):
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{mtls_server.port}", credentials) as channel:
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        project, agent, session = session_ids()
        spawned = await stub.Spawn(
            lifecycle_pb2.SpawnRequest(
                project_id=project, agent_instance_id=agent, session_id=session
            ),
            timeout=10,
        )
    assert spawned.session.state == lifecycle_pb2.SESSION_STATE_ACTIVE


async def test_tls_and_tokens_together(base_config: Config, pki: Pki, tmp_path: Path):
    token = new_token()
    tokens = write_tokens(tmp_path / "tokens", f"{token} {PROJECT}")
    config = tls_config(base_config, pki, mutual=True, auth_tokens_file=str(tokens))
    mutual = TLS(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    async with Server(config) as server:
        target = f"127.0.0.1:{server.port}"
        async with AsyncClient(target, tls=mutual, retry=ONCE) as client:
            with pytest.raises(Unauthenticated):
                await client.session(*session_ids()).spawn()
        async with AsyncClient(target, tls=mutual, token=token, retry=ONCE) as client:
            await client.session(*session_ids()).spawn()


def presented_certificate(port: int, pki: Pki) -> str:
    """The PEM certificate the server shows a new connection."""
    return ssl.get_server_certificate(("127.0.0.1", port), ca_certs=str(pki.ca), timeout=5)


async def test_a_renewed_certificate_is_served_without_a_restart(base_config: Config, own_pki: Pki):
    config = tls_config(base_config, own_pki, auth_reload_interval_seconds=0.1)
    async with Server(config) as server:
        assert server.port is not None
        old = own_pki.server_cert.read_text()
        presented = await asyncio.to_thread(presented_certificate, server.port, own_pki)
        assert _same_certificate(presented, old)
        await asyncio.to_thread(renew_server_certificate, own_pki)
        new = own_pki.server_cert.read_text()
        assert not _same_certificate(new, old)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not _same_certificate(
            await asyncio.to_thread(presented_certificate, server.port, own_pki), new
        ):
            assert loop.time() < deadline, "the renewed certificate was never served"
            await asyncio.sleep(0.1)
        # Calls keep working over the new certificate.
        async with AsyncClient(
            f"127.0.0.1:{server.port}", tls=TLS(ca_file=own_pki.ca), retry=ONCE
        ) as client:
            await client.session(*session_ids()).spawn()


async def test_a_broken_certificate_update_keeps_the_old_one(base_config: Config, own_pki: Pki):
    async with Server(tls_config(base_config, own_pki)) as server:
        assert server.port is not None
        old = own_pki.server_cert.read_text()
        # A key that is not the certificate's: refused, the old pair stays.
        os.replace(own_pki.client_key, own_pki.server_key)
        await server.reload_credentials()
        presented = await asyncio.to_thread(presented_certificate, server.port, own_pki)
        assert _same_certificate(presented, old)


def _same_certificate(one: str, other: str) -> bool:
    return ssl.PEM_cert_to_DER_cert(one) == ssl.PEM_cert_to_DER_cert(other)


async def test_the_cli_speaks_tls_and_mutual_tls(mtls_server: Server, tls_server: Server, pki: Pki):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")}
    session = ["-p", PROJECT, "-a", AGENT, "-s", f"cli-{uuid.uuid4().hex[:8]}"]

    async def cli(*args: str, extra: dict[str, str] | None = None) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            MEMSVC, *args, "--timeout", "5", env=env | (extra or {}),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode is not None
        return process.returncode, (out + err).decode()

    tls_address = ["--address", f"127.0.0.1:{tls_server.port}"]
    code, text = await cli("spawn", *session, *tls_address, "--tls-ca", str(pki.ca))
    assert code == 0, text
    code, text = await cli("sessions", "show", *session, *tls_address)
    assert code == 5 and "--tls-ca if it serves TLS" in text

    # Mutual TLS from the MEMSVC_TLS_* variables (the two servers share a database:
    # another session).
    session[-1] += "-mutual"
    mutual = {
        "MEMSVC_ADDRESS": f"127.0.0.1:{mtls_server.port}",
        "MEMSVC_TLS_CA": str(pki.ca),
        "MEMSVC_TLS_CERT": str(pki.client_cert),
        "MEMSVC_TLS_KEY": str(pki.client_key),
    }
    code, text = await cli("spawn", *session, extra=mutual)
    assert code == 0, text
    without_cert = {
        k: v for k, v in mutual.items() if k not in ("MEMSVC_TLS_CERT", "MEMSVC_TLS_KEY")
    }
    code, text = await cli("sessions", "show", *session, extra=without_cert)
    assert code == 5, text
    code, text = await cli("sessions", "show", *session, "--tls-key", "/nope", extra=mutual)
    assert code == 2 and "/nope" in text
