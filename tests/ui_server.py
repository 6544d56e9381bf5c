"""The MLflow UI as users start it (``dblocks ui``), on a free loopback port, for tests that talk to it over
HTTP; stopped with its worker processes (the process group it was started in) whatever the test did."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and its workers: the process group this test started, by its id."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def ui_server(uri: str, log: Path, cwd: Path | None = None):
    """``dblocks ui --tracking-uri URI`` in the background (it boots while the caller goes on); yields its
    url, port, process, log path and a ``stop()``."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner process
    env.pop("MLFLOW_TRACKING_URI", None)  # the environment would win over the URI given
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "dblocks"), "ui", "--tracking-uri", uri, "--port", str(port)],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            yield SimpleNamespace(
                url=f"http://127.0.0.1:{port}", port=port, proc=proc, log=log, stop=lambda: stop(proc)
            )
        finally:
            stop(proc)


def wait_healthy(server, timeout: float = 90.0) -> None:
    """Until the server answers /health (a test fails with the server's log if it exits or never does)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"mlflow server exited ({server.proc.returncode}): {server.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    pytest.fail(f"mlflow server not healthy after {timeout} s: {server.log.read_text()[-2000:]}")
