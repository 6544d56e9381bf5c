"""The MLflow UI as users start it (``dblocks ui``), on a free loopback port, for tests that talk to it over
HTTP; stopped with its worker processes (the process group it was started in) whatever the test did."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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
        proc = subprocess.Popen([str(VENV_BIN / "dblocks"), "ui", "--tracking-uri", uri, "--port", str(port)],
                                cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, proc=proc, log=log,
                                  stop=lambda: stop(proc))
        finally:
            stop(proc)
