"""A throwaway PostgreSQL cluster on a loopback port, from Debian's `postgresql` package.

    with ThrowawayPostgres() as pg:
        pg.create_database("dagster")
        dsn = pg.url("dagster")

`initdb` refuses to run as root, so as root the cluster belongs to the `postgres` system user (the
Debian package creates it). The data directory is a fresh temporary folder, deleted on exit.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from car_maker_pipeline_tests.support.dagster_dev import free_loopback_port

PASSWORD = "throwaway-test-password"


def postgres_bin_dir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class ThrowawayPostgres:
    def __init__(self):
        self.bin = postgres_bin_dir()
        if self.bin is None:
            raise FileNotFoundError("PostgreSQL server binaries not found (apt-get install -y postgresql)")
        self.port = free_loopback_port()
        self.root = Path(tempfile.mkdtemp(prefix="car-maker-pg-"))
        self.data = self.root / "data"
        self.user = "car_maker"

    def _run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)

    def start(self) -> ThrowawayPostgres:
        os.chmod(self.root, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        password_file = self.root / "pwfile"
        password_file.write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            shutil.chown(password_file, "postgres", "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=scram-sha-256",
            f"--pwfile={password_file}",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off",
            "start",
        )
        return self

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        return {"PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": self.user, "PGPASSWORD": PASSWORD}

    def create_database(self, name: str) -> None:
        subprocess.run(
            [str(self.bin / "createdb"), name],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, **self.env()},
        )

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def query(self, database: str, sql: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.user, password=PASSWORD, dbname=database
        ) as conn:
            return conn.execute(sql).fetchall()
