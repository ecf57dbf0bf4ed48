"""A real `dagster dev` (webserver + daemon + code server) for tests, on a free loopback port.

The command is the one `make ui` runs (read with `make -n ui`), with only the port changed, so the
tests exercise the project's own server settings (host, workspace), not a copy of them.

    with DagsterDev(tmp_path) as server:
        client = server.graphql_client()
        ...

It runs the repo's `workspace.yaml` with a temporary DAGSTER_HOME holding the project's own
`dagster.yaml` (gpu pool, run monitoring, run retries), a temporary CAR_MAKER_HOME and its own MLflow
store, and stops the whole process group it started on exit, whatever the test did.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DAGSTER = str(Path(sys.executable).with_name("dagster"))
STOP_GRACE_SECONDS = 2  # how long stop() lets dagster dev shut down before killing its process group


def project_ui_command(port: int) -> list[str]:
    """`make ui`'s `dagster dev` command line, on `port`, run by this interpreter's dagster."""
    printed = subprocess.run(["make", "-s", "-n", "ui"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    argv = shlex.split(next(line for line in printed.splitlines() if "dagster dev" in line))
    argv[0] = DAGSTER  # the Makefile's .venv/bin/dagster, or whichever environment runs the tests
    argv[argv.index("-p") + 1] = str(port)
    return argv


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DagsterDev:
    def __init__(self, root: Path, extra_instance_yaml: str = "", startup_timeout: float = 240.0):
        self.root = Path(root)
        self.home = self.root / "dagster_home"
        self.car_maker_home = self.root / "car_maker_home"
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_instance_yaml = extra_instance_yaml
        self.startup_timeout = startup_timeout
        self.log_path = self.root / "dagster_dev.log"
        self.process: subprocess.Popen | None = None

    # ------------------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DAGSTER_HOME")}
        return {
            **inherited,
            "DAGSTER_HOME": str(self.home),
            "CAR_MAKER_HOME": str(self.car_maker_home),
            "CAR_MAKER_PROFILE": "demo",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "DAGSTER_DISABLE_TELEMETRY": "1",
        }

    def start(self) -> DagsterDev:
        self.home.mkdir(parents=True, exist_ok=True)
        instance_yaml = (REPO / "dagster.yaml").read_text() + "\n" + self.extra_instance_yaml
        (self.home / "dagster.yaml").write_text(instance_yaml)
        log = open(self.log_path, "w")  # noqa: SIM115 (the server writes to it after this returns)
        self.process = subprocess.Popen(
            project_ui_command(self.port),
            cwd=REPO,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dagster dev exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._code_location_loaded():
                return self
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(
            f"dagster dev did not serve the code location within {self.startup_timeout:.0f}s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            # dagster dev shuts its webserver, daemon and code server down on SIGTERM/SIGINT, but after a
            # run-heavy test it waited its full 60 s for a daemon still in an iteration (two teardowns of
            # 60.00 s in every suite; with a 10-s grace, both teardowns took the 10 s). The instance is thrown
            # away with the test's folder, so after a short grace the process group is killed, as it is anyway
            # in case a run worker outlived them.
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=STOP_GRACE_SECONDS)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None

    def __enter__(self) -> DagsterDev:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text()[-chars:]
        except OSError:
            return ""

    # ------------------------------------------------------------------------------------------

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 30.0) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise AssertionError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def graphql_client(self):
        from dagster_graphql import DagsterGraphQLClient

        return DagsterGraphQLClient("127.0.0.1", port_number=self.port, timeout=60)

    def _code_location_loaded(self) -> bool:
        try:
            data = self.graphql(
                "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
                "locationOrLoadError { __typename } } } } }",
                timeout=5,
            )
        except (urllib.error.URLError, ConnectionError, OSError, AssertionError, ValueError):
            return False
        entries = data["workspaceOrError"].get("locationEntries", [])
        return bool(entries) and all(
            e["loadStatus"] == "LOADED" and e["locationOrLoadError"]["__typename"] == "RepositoryLocation"
            for e in entries
        )

    def wait_for_run(self, run_id: str, timeout: float = 600.0) -> str:
        """Poll until the run ends; returns its final status name."""
        client = self.graphql_client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = client.get_run_status(run_id).value
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                return status
            time.sleep(1.0)
        raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f}s:\n{self.log_tail()}")


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port`, read from /proc/net/tcp{,6} (Linux)."""
    found = set()
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            if family == 4:
                found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
            else:
                words = bytes.fromhex(address)
                found.add(socket.inet_ntop(socket.AF_INET6, b"".join(words[i : i + 4][::-1] for i in range(0, 16, 4))))
    return found


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None
