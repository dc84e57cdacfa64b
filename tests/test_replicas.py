"""Replicas (issue 18): several cit-server processes on one registry directory, one writer. Each server picks up
new versions by itself within its refresh interval, and no request ever meets a version half written; a writer
refuses a file system whose lock would not keep a second writer out."""
import shutil
import threading
import time

import grpc
import pytest

from cit_client import CitClient
from cit_registry import store
from cit_registry.store import PARTS, LockNotExclusive, Registry, TaskCard, _copy_from
from cit_server.process import ServerProcess

from .test_end_to_end import first_test_sample

REFRESH_S = 1.0  # ServerConfig.refresh_seconds' default
VERSIONS = 3     # versions the writer commits while the replicas serve


def test_two_replicas_follow_one_writer_and_never_serve_a_torn_version(registry, task_dirs, tmp_path):
    reg = Registry.open(shutil.copytree(registry, tmp_path / "reg"))
    sample = first_test_sample(task_dirs, "digits")
    v1 = reg.get("digits", 1)
    seen: dict[str, list[int]] = {}
    errors: list[str] = []
    stop = threading.Event()

    def hammer(name: str, target: str) -> None:
        """Forced and routed requests, back to back: each new version's adapter is read from disk as it lands."""
        with CitClient(target) as client:
            while not stop.is_set():
                for forced in ("digits", None):
                    try:
                        r = client.generate(sample.image, sample.instruction, task_id=forced, max_new_tokens=1)
                        seen[name].append(r.route.version)
                    except grpc.RpcError as exc:
                        errors.append(f"{name}: {exc.code().name} {exc.details()}")

    with ServerProcess(reg.root) as a, ServerProcess(reg.root) as b:
        readers = []
        for name, server in (("a", a), ("b", b)):
            seen[name] = []
            readers.append(threading.Thread(target=hammer, args=(name, server.target), daemon=True))
            readers[-1].start()
        lag = {}
        for version in range(2, 2 + VERSIONS):
            card = TaskCard.from_json(v1.card.to_json())
            card.version = version
            reg.commit(card, v1.key(), {p: _copy_from(v1.path / p) for p in (*PARTS["eproj"], "eval")})
            committed = time.monotonic()
            for name, server in (("a", a), ("b", b)):
                with CitClient(server.target) as client:
                    while client.generate(sample.image, sample.instruction, task_id="digits",
                                          max_new_tokens=1).route.version != version:
                        assert time.monotonic() - committed < REFRESH_S + 1.0, f"{name} did not serve v{version}"
                        time.sleep(0.05)
                lag[name, version] = time.monotonic() - committed
        stop.set()
        for reader in readers:
            reader.join(timeout=60)
    assert not errors, errors[:5]
    for name, versions in seen.items():
        assert versions == sorted(versions), f"{name} served an older version after a newer one"
        assert versions[0] == 1 and versions[-1] == 1 + VERSIONS and len(versions) > 2 * VERSIONS
    print(f"\n  replicas: new version served {max(lag.values()):.2f} s after its commit at most")


def test_a_file_system_whose_lock_keeps_nobody_out_is_not_written(tmp_path, monkeypatch):
    """As on some network and FUSE mounts: flock returns, and another process could take the lock as well."""
    reg = Registry.open(tmp_path / "reg", create=True)
    store._EXCLUSIVE_LOCKS.discard(reg.root.resolve())  # checked once per process and directory
    monkeypatch.setattr(store.fcntl, "flock", lambda fd, operation: None)
    with pytest.raises(LockNotExclusive, match="does not keep other processes out"), reg.writing():
        pass
    monkeypatch.undo()
    with reg.writing():  # a working lock: written (and checked again, since the check failed before)
        assert reg.root.resolve() in store._EXCLUSIVE_LOCKS
