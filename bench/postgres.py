"""A throwaway PostgreSQL server in a temporary folder, for the shared-study tests and benchmarks.

``initdb``/``pg_ctl`` (PostgreSQL 15 on this project's machines) must be on PATH. ``initdb`` refuses to run as
root, so as root the server runs as the ``postgres`` system user (``runuser``), in a folder that user owns.
It listens on 127.0.0.1 only, on a free port, trusts local connections, and skips fsync (a test server).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """Why a server cannot be started here (shown as the skip reason)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TempPostgres:
    """``with TempPostgres() as pg: pg.url`` -> postgresql://sppscl@127.0.0.1:PORT/postgres; stopped and deleted on exit."""

    def __init__(self, password: str | None = None) -> None:
        """``password``: the server asks for it (scram-sha-256) and ``url`` carries none, so a client must find it
        elsewhere (PGPASSWORD, ~/.pgpass); None: local connections are trusted."""
        self.root: Path | None = None
        self.url = ""
        self.password = password
        self._as: list[str] = []
        self._start_cmd: list[str] = []

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=120)

    def start(self) -> "TempPostgres":
        missing = [b for b in ("initdb", "pg_ctl") if shutil.which(b) is None]
        if missing:
            raise PostgresUnavailable(f"PostgreSQL is not installed here ({', '.join(missing)} not on PATH)")
        self.root = Path(tempfile.mkdtemp(prefix="sppscl-pg-"))
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no 'postgres' system user to run initdb as") from None
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        data, port = self.root / "data", _free_port()
        auth = ["--auth=trust"]
        if self.password is not None:
            pwfile = self.root / "pw"
            pwfile.write_text(self.password + "\n")
            if self._as:
                os.chown(pwfile, user.pw_uid, user.pw_gid)
            auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        init = self._run(shutil.which("initdb"), "-D", str(data), "-U", "sppscl", *auth, "-E", "UTF8", "--no-sync")
        if init.returncode:
            raise PostgresUnavailable(f"initdb failed: {init.stderr.strip()[-500:]}")
        opts = f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._start_cmd = [shutil.which("pg_ctl"), "-D", str(data), "-o", opts, "-l", str(self.root / "server.log"), "-w", "-t", "60", "start"]
        started = self._run(*self._start_cmd)
        if started.returncode:
            log = (self.root / "server.log").read_text()[-500:] if (self.root / "server.log").exists() else ""
            raise PostgresUnavailable(f"pg_ctl start failed: {started.stderr.strip()[-300:]} {log}")
        self.url = f"postgresql://sppscl@127.0.0.1:{port}/postgres"
        return self

    def pause(self) -> None:
        """Stop the server as an outage would (immediate), keeping its data for :meth:`resume`."""
        self._run(shutil.which("pg_ctl") or "pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")

    def resume(self) -> None:
        started = self._run(*self._start_cmd)
        if started.returncode:
            raise PostgresUnavailable(f"pg_ctl start failed: {started.stderr.strip()[-300:]}")

    def stop(self) -> None:
        if self.root is None:
            return
        if (self.root / "data" / "postmaster.pid").exists():
            self._run(shutil.which("pg_ctl") or "pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> "TempPostgres":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
