"""The vLLM worker's lifecycle without vLLM: a worker that stays silent misses its start deadline, and every way
a server ends stops the worker it started (tests/fake_lm_worker.py stands in for vLLM; its server, parent watch
and the server-side supervision are cit's real code)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cit_registry.store import Registry
from cit_server.process import ServerProcess
from cit_server.vllm_engine import WorkerError, WorkerProcess

FAKE = Path(__file__).with_name("fake_lm_worker.py")


def interpreter(tmp_path: Path, body: str) -> Path:
    """An executable that WorkerProcess starts as vLLM's python (`PY -m cit_server.vllm_worker ARGS`)."""
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\nshift 2\n{body}\n")
    script.chmod(0o755)
    return script


def gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":  # exited, not yet reaped by its parent
            return True
        time.sleep(0.1)
    return False


def test_a_silent_worker_misses_its_start_deadline_and_is_stopped(tmp_path):
    python = interpreter(tmp_path, f"echo $$ > {tmp_path}/pid\nexec sleep 12")
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="did not start within 2 s"):
        WorkerProcess(str(python), tmp_path, max_loras=2, timeout=2)
    assert time.monotonic() - t0 < 10
    assert gone(int((tmp_path / "pid").read_text()), within=5)


@pytest.fixture()
def fake_worker(tmp_path):
    return interpreter(tmp_path, f'exec {sys.executable} {FAKE} {tmp_path}/pid -- "$@"'), tmp_path / "pid"


def test_a_server_that_cannot_bind_stops_the_worker_it_started(tmp_path, fake_worker):
    python, pidfile = fake_worker
    registry = Registry.open(tmp_path / "reg", create=True).root
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = tmp_path / "server.log"
        with open(log, "w") as out:  # a file, not a pipe: a worker left running would hold a pipe open
            server = subprocess.Popen(["cit-server", "--registry", str(registry), "--port", str(port), "--engine",
                                       "vllm", "--vllm-python", str(python)], stdout=out, stderr=subprocess.STDOUT,
                                      env={**os.environ, "FAKE_NO_PARENT_WATCH": "1"})  # only the server stops it
            code = server.wait(timeout=300)
    assert code == 2 and "could not bind" in log.read_text(), log.read_text()
    assert gone(int(pidfile.read_text()), within=5)


def test_a_worker_outlives_no_killed_server(tmp_path, fake_worker):
    python, pidfile = fake_worker
    registry = Registry.open(tmp_path / "reg", create=True).root
    srv = ServerProcess(registry, "--engine", "vllm", "--vllm-python", str(python))
    pid = int(pidfile.read_text())
    assert not gone(pid, within=0.5)
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()
    assert gone(pid, within=10), "the worker kept running after its server was killed"


def test_a_dead_worker_is_restarted_off_the_scheduler_while_health_says_not_serving(tmp_path, fake_worker, backbone,
                                                                                    monkeypatch):
    from cit_backbone.sampling import Sampling
    from cit_server.config import ServerConfig
    from cit_server.engine import Engine, Request

    from .test_isolation import png

    python, pidfile = fake_worker
    monkeypatch.setenv("FAKE_START_S", "4")  # a start as slow as a small vLLM's: the restart takes a while
    engine = Engine(ServerConfig(registry=Registry.open(tmp_path / "reg", create=True).root, engine="vllm",
                                 vllm_python=str(python)), backbone=backbone)
    try:
        first = engine.supervisor.worker.proc
        assert engine.ready()
        first.kill()
        first.wait()
        assert not engine.ready()  # health follows: NOT_SERVING
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="restarting|exited"):  # told to retry at once, not kept waiting
            engine.generate(Request(png((1, 2, 3)), "Describe the image.", Sampling(max_new_tokens=2)))
        assert time.monotonic() - t0 < 2, "the scheduler waited for the restart"
        deadline = time.monotonic() + 60
        while not engine.ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert engine.ready() and engine.supervisor.worker.proc is not first
    finally:
        engine.close()
