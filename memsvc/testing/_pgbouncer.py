"""A PgBouncer of the test's own, in transaction mode, in front of a PostgreSQL."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

from memsvc.testing._processes import wait_for_port

# PgBouncer refuses to run as root; the tests run it as this user.
RUN_AS = "postgres"


class PrivatePgBouncer:
    """``pgbouncer`` on a port of its own, pooling in transaction mode.

    Every database of the PostgreSQL at ``target_port`` is reachable through it
    under its own name, as ``user`` (no password: ``auth_type = any``), so a
    test's private database works through the pooler as it is.
    """

    def __init__(
        self,
        port: int,
        workdir: Path,
        *,
        target_port: int = 5432,
        user: str = "postgres",
        pool_size: int = 10,
    ) -> None:
        self.port = port
        self.workdir = workdir
        self.target_port = target_port
        self.user = user
        self.pool_size = pool_size
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        """The URL of ``database`` through the pooler."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not Path(binary).exists():
            raise FileNotFoundError(
                "pgbouncer is not installed (Debian: apt-get install pgbouncer)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={self.target_port} user={self.user}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            "auth_type = any\npool_mode = transaction\n"
            f"max_client_conn = 200\ndefault_pool_size = {self.pool_size}\n"
            # psycopg sends these at connect; the pooler must accept them.
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self.workdir / 'pgbouncer.log'}\n"
        )
        command = [binary, str(config)]
        if os.geteuid() == 0:
            account = pwd.getpwnam(RUN_AS)
            for path in (self.workdir, config):
                os.chown(path, account.pw_uid, account.pw_gid)
            command = ["runuser", "-u", RUN_AS, "--", *command]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
            self._process = None
