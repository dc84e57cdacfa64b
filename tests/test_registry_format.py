"""The registry's on-disk format: a registry written by earlier code (formats 1 and 2, tests/data) is refused with
a clear message until `cit-registry migrate` upgrades it, after which it verifies clean and routes as before."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cit_registry.router import Router
from cit_registry.store import FORMAT_VERSION, Registry, TaskKey

FORMAT1 = Path(__file__).parent / "data" / "registry-format1"
FORMAT2 = Path(__file__).parent / "data" / "registry-format2"


@pytest.fixture
def old(tmp_path) -> Path:
    return Path(shutil.copytree(FORMAT1, tmp_path / "reg"))


def cli(*args):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=600)


def test_an_unmigrated_registry_is_refused_with_the_command_that_upgrades_it(old):
    with pytest.raises(ValueError, match="format 1 .*cit-registry migrate"):
        Registry.open(old)
    out = cli("cit-server", "--registry", str(old), "--port", "0")
    assert out.returncode == 2 and "cit-registry migrate" in out.stderr, out.stderr[-2000:]
    out = cli("cit-registry", "list", "--registry", str(old))
    assert out.returncode == 2 and "cit-registry migrate" in out.stdout


def test_migrate_upgrades_format_1_in_place_and_is_safe_to_run_twice(old):
    before = {t: TaskKey.load(sorted((old / "tasks" / t).glob("v*"))[-1] / "key.safetensors").routing_vectors
              for t in ("alpha", "beta")}
    out = cli("cit-registry", "migrate", "--registry", str(old))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "alpha v1: had no manifest" in out.stdout and "format 1 -> 2" in out.stdout
    assert f"format 2 -> {FORMAT_VERSION}" in out.stdout
    reg = Registry.open(old)
    assert reg.meta()["format"] == FORMAT_VERSION and reg.generation() == 1
    record = reg.backbone()
    assert record["key"] == {"image": 8, "instruction": 4, "output": 4}
    assert record["adapter"] == {"feature_dim": 8, "hidden_size": 6, "num_tokens": 1, "projector": "linear"}
    assert record["lora"]["modules"] == {"q_proj": [6, 6]}
    assert cli("cit-registry", "verify", "--registry", str(old)).returncode == 0
    router = Router.load(reg)
    for task, vectors in before.items():
        assert router.search(vectors[:1], k=1)[0][0].task_id == task
    again = cli("cit-registry", "migrate", "--registry", str(old))
    assert again.returncode == 0 and "current format already" in again.stdout
    assert json.loads((old / "registry.json").read_text())["backbone"] == record


def test_migrate_upgrades_format_2_and_every_task_serves_the_version_it_served(tmp_path):
    old = Path(shutil.copytree(FORMAT2, tmp_path / "reg"))
    out = cli("cit-server", "--registry", str(old), "--port", "0")
    assert out.returncode == 2 and "format 2" in out.stderr and "cit-registry migrate" in out.stderr, out.stderr[-2000:]
    served = {t: sorted((old / "tasks" / t).glob("v*"))[-1].name for t in ("alpha", "beta", "gamma")}
    out = cli("cit-registry", "migrate", "--registry", str(old))
    assert out.returncode == 0 and f"format 2 -> {FORMAT_VERSION}" in out.stdout, out.stdout + out.stderr
    reg = Registry.open(old)
    assert reg.fingerprint() == [[t, int(v[1:])] for t, v in served.items()]
    assert [(c.action.value, c.detail) for c in reg.history()] == [("migrate", {"from": 2, "to": FORMAT_VERSION})]
    assert reg.generation() == 3  # 2 before: a running server would see the change
    assert cli("cit-registry", "verify", "--registry", str(old)).returncode == 0
    assert cli("cit-registry", "retire", "beta", "--registry", str(old)).returncode == 0
    assert [t.task_id for t in reg.serving()] == ["alpha", "gamma"]
