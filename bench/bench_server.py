"""A real ``lmdistill serve`` subprocess for the serving benchmarks (``serve_throughput.py``, ``server_limits.py``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, extra: list[str], threads: int, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """``lmdistill serve MODEL --model-name m *extra`` on a free port with ``threads`` torch threads (0: torch's
    default); returns the process and its base URL once ``/health`` answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "lmdistill", "serve", model, "--port", str(port), "--model-name", "m", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start within {timeout:.0f} s")
