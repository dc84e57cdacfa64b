"""A `cit-server` in a child process on a free port: what the tests, the routing suite and the load benchmark start.

Its output is read all along by a thread of its own, so a server that logs a lot never blocks on a full pipe, and
everything it printed is at hand when it stops. Imports nothing heavy (no torch): the caller only talks gRPC to it.
"""
from __future__ import annotations

import os
import re
import subprocess
import threading
from pathlib import Path

LISTENING = re.compile(r"listening on ([\d.]+:\d+)")
METRICS = re.compile(r"metrics on ([\d.]+:\d+)")
HTTP = re.compile(r"OpenAI HTTP API on ([\d.]+:\d+)")


class ServerProcess:
    """`cit-server --registry REGISTRY --port 0 ARGS...`, started and waited for (up to `timeout` seconds) until it
    says where it listens. `target` is its gRPC address, `banner` that line, `metrics_url` its Prometheus page
    (None unless the banner names one), `http_address` its OpenAI HTTP API's HOST:PORT (None without
    --http-port). A context manager: leaving it stops the server."""

    def __init__(self, registry: Path, *args: str, env: dict | None = None, timeout: float = 300.0) -> None:
        self.proc = subprocess.Popen(
            ["cit-server", "--registry", str(registry), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self.banner = ""
        started = threading.Event()

        def drain() -> None:
            assert self.proc.stdout is not None  # started with stdout=PIPE
            for line in self.proc.stdout:
                self.lines.append(line)
                if not self.banner and LISTENING.search(line):
                    self.banner = line
                    started.set()
            started.set()  # the server exited before it listened

        self._drain = threading.Thread(target=drain, name="cit-server-output", daemon=True)
        self._drain.start()
        if not started.wait(timeout) or not self.banner:
            output = self.stop()
            raise RuntimeError(f"cit-server did not start within {timeout:.0f} s:\n{output[-8000:]}")
        listening = LISTENING.search(self.banner)
        assert listening is not None  # the banner is the line that matched
        self.target = listening.group(1)
        metrics = METRICS.search(self.banner)
        self.metrics_url = f"http://{metrics.group(1)}/metrics" if metrics else None
        http = HTTP.search(self.banner)
        self.http_address = http.group(1) if http else None  # the OpenAI API's HOST:PORT (--http-port)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        """Stop the server (SIGTERM, then SIGKILL after 30 s) and return everything it printed."""
        if self.alive():
            self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._drain.join(timeout=10)
        return "".join(self.lines)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
