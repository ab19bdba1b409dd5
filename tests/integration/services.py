"""Real services for the integration tests: a Prefect server, CLI subprocesses, flow-run polling.

Everything binds to and talks to 127.0.0.1. Every process a test starts gets its own session
(process group), and is stopped by that PID: SIGTERM to the group, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
UUID = re.compile(r"UUID: ([0-9a-f-]{36})")
QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group we started (its PID), twice if needed, then SIGKILL."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace / 2), (signal.SIGTERM, grace / 2), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class PrefectServer:
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME and sqlite database."""

    home: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def env(self) -> dict[str, str]:
        """The environment for a client process (CLI, flow, worker) of this server."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        return {
            **base,
            **QUIET,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }

    def start(self, timeout: float = 180.0) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {
            **self.env,
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
            "PREFECT_UI_ENABLED": "false",
        }
        log = (self.home / "server.log").open("wb")
        self.process = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited: {(self.home / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        log_tail = (self.home / "server.log").read_text()[-3000:]
        raise RuntimeError(f"prefect server not healthy after {timeout}s: {log_tail}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    # --- the REST API -----------------------------------------------------------------------

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.api_url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        response = httpx.post(f"{self.api_url}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return self.get(f"/flow_runs/{run_id}")

    def wait_flow_run(self, run_id: str, timeout: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state_type"] in FINAL_STATES:
                return run
            time.sleep(1)
        raise TimeoutError(f"flow run {run_id} not finished after {timeout}s: {run['state_type']}")

    def task_runs(self, flow_run_id: str) -> list[dict[str, Any]]:
        """Task runs of a flow run and of its subflow runs."""
        children = self.post("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}})
        runs = [flow_run_id, *(r["id"] for r in children)]
        return self.post("/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": runs}}})

    def artifacts(self, flow_run_id: str) -> list[dict[str, Any]]:
        return self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})


def run(
    args: list[str], env: dict[str, str], timeout: float = 300.0, check: bool = True, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """A CLI command in its own process group; killed (by that PID) if it outlives `timeout`."""
    process = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(process)
        out, _ = process.communicate()
        raise AssertionError(f"{' '.join(args)} timed out after {timeout}s:\n{out[-6000:]}") from None
    result = subprocess.CompletedProcess(args, process.returncode, out, "")
    if check and process.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {process.returncode}:\n{out[-6000:]}")
    return result


def last_json(text: str) -> Any:
    """The last top-level JSON object a command printed (`ddr run` prints its result last)."""
    end = text.rindex("\n}") + 2
    start = text.rfind("\n{", 0, end) + 1
    return json.loads(text[start:end])


def created_flow_run_id(output: str) -> str:
    match = UUID.search(output)
    assert match, f"no flow run UUID in:\n{output}"
    return match.group(1)
