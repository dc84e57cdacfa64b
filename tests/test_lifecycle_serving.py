"""A running server follows the task lifecycle (issue 17, part 3): a rollback, a retirement and a promotion made
with `cit-registry` on the registry's disk reach routing within the server's refresh interval (1 s) plus one second,
polled; the admin RPCs make the same changes over the wire and routing follows before they answer. On a copy of the
session's real registry (fashion-mnist has versions 1 and 2: the reused data set), served by its own server."""
import asyncio
import base64
import json
import shutil
import subprocess
import time

import grpc
import httpx
import pytest

from cit_client import AsyncCitClient, CitClient
from cit_registry.store import PARTS, Registry, TaskCard, _copy_from
from cit_server.process import ServerProcess

from .test_end_to_end import first_test_sample

ADMIN = "admin-token-for-tests"
REFRESH_S = 1.0  # ServerConfig.refresh_seconds' default


@pytest.fixture(scope="module")
def served(registry, tmp_path_factory):
    copy = shutil.copytree(registry, tmp_path_factory.mktemp("lifecycle") / "reg")
    with ServerProcess(copy, "--admin-token", ADMIN, "--http-port", "0") as srv:
        yield Registry.open(copy), srv


def cli(reg, *args):
    out = subprocess.run(["cit-registry", *args, "--registry", str(reg.root)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def within(condition, seconds=REFRESH_S + 1.0):
    """Poll until condition() is true; how long it took (fails past `seconds`)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, f"not seen within {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - start


def served_by(client, sample) -> tuple[str, int]:
    r = client.generate(sample.image, sample.instruction, max_new_tokens=1)
    return r.route.task_id, r.route.version


@pytest.fixture
def sample(task_dirs):
    return first_test_sample(task_dirs)


def test_a_rollback_on_disk_reaches_the_running_server_within_its_refresh_interval(served, sample):
    reg, srv = served
    with CitClient(srv.target) as client:
        assert served_by(client, sample) == ("fashion-mnist", 2)
        cli(reg, "rollback", "fashion-mnist", "--to", "1")
        within(lambda: served_by(client, sample) == ("fashion-mnist", 1))
        forced = client.generate(sample.image, sample.instruction, task_id="fashion-mnist", max_new_tokens=1)
        assert forced.route.version == 1
        assert {t.task_id: t.version for t in client.list_tasks()}["fashion-mnist"] == 1
        cli(reg, "rollback", "fashion-mnist", "--to", "latest")
        within(lambda: served_by(client, sample) == ("fashion-mnist", 2))


def test_a_retired_task_leaves_routing_and_comes_back_restored(served, sample):
    reg, srv = served
    with CitClient(srv.target) as client:
        cli(reg, "retire", "fashion-mnist")
        within(lambda: served_by(client, sample)[0] != "fashion-mnist")
        with pytest.raises(grpc.RpcError) as err:
            client.generate(sample.image, sample.instruction, task_id="fashion-mnist", max_new_tokens=1)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "retired" in err.value.details()
        assert "fashion-mnist" not in {t.task_id for t in client.list_tasks()}
        models = httpx.get(f"http://{srv.http_address}/v1/models").json()["data"]
        assert "fashion-mnist" not in {m["id"] for m in models}
        image = base64.b64encode(sample.image.read_bytes()).decode()
        forced = httpx.post(f"http://{srv.http_address}/v1/chat/completions", timeout=60, json={
            "model": "fashion-mnist", "max_tokens": 1, "messages": [{"role": "user", "content": [
                {"type": "text", "text": sample.instruction},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}]})
        assert forced.status_code == 404 and "retired" in forced.json()["error"]["message"]
        cli(reg, "restore", "fashion-mnist")
        within(lambda: served_by(client, sample) == ("fashion-mnist", 2))


def test_a_candidate_serves_only_once_promoted_over_the_admin_rpc(served, sample):
    reg, srv = served
    v2 = reg.get("fashion-mnist", 2)
    card = TaskCard.from_json(v2.card.to_json())
    card.version, card.gate = 3, {"max_forgetting": 1.0, "forgetting": 6.0, "passed": False}
    reg.commit(card, v2.key(), {p: _copy_from(v2.path / p) for p in (*PARTS["eproj"], "eval")})
    with CitClient(srv.target, token=ADMIN) as admin:
        admin.reload_registry()  # the server has read the registry with the candidate in it ...
        assert served_by(admin, sample) == ("fashion-mnist", 2)  # ... and does not serve it
        r = admin.change_task("fashion-mnist", "promote")
        assert r.changed and r.serving_version == 3 and r.entry.action == "promote" and r.entry.version == 3
        assert r.entry.who.startswith("admin-rpc ")
        assert served_by(admin, sample) == ("fashion-mnist", 3)  # at once: the RPC reloads before it answers
        again = admin.change_task("fashion-mnist", "rollback", 2)
        assert again.changed and again.serving_version == 2 and served_by(admin, sample) == ("fashion-mnist", 2)
        with pytest.raises(grpc.RpcError) as err:
            admin.change_task("fashion-mnist", "reject", 3)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not a candidate" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            admin.change_task("nosuch", "retire")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            admin.change_task("fashion-mnist", "rollback", 9)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no version 9" in err.value.details()
        history = admin.history("fashion-mnist")
        assert [e.action for e in history[-3:]] == ["commit", "promote", "rollback"]
        assert json.loads(history[-1].detail_json) == {"from": 3, "newest": 3}
        assert admin.change_task("fashion-mnist", "rollback").serving_version == 3
    with CitClient(srv.target) as anyone, pytest.raises(grpc.RpcError) as err:
        anyone.change_task("fashion-mnist", "retire")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert [c.action.value for c in reg.history()][-2:] == ["rollback", "rollback"]  # the server wrote the registry's


def test_the_async_client_changes_tasks_and_reads_the_history(served, sample):
    _, srv = served

    async def run():
        async with AsyncCitClient(srv.target, token=ADMIN) as admin:
            retired = await admin.change_task("digits", "retire")
            again = await admin.change_task("digits", "retire")
            restored = await admin.change_task("digits", "restore")
            return retired, again, restored, await admin.history("digits", limit=2)

    retired, again, restored, history = asyncio.run(run())
    assert retired.changed and retired.serving_version == 0
    assert not again.changed and restored.changed and restored.serving_version >= 1
    assert [e.action for e in history] == ["retire", "restore"]
    with pytest.raises(ValueError, match="change must be one of"):
        CitClient(srv.target).change_task("digits", "delete")
