"""The registry's on-disk format: a registry written by the previous code (format 1, tests/data) is refused with
a clear message until `cit-registry migrate` upgrades it, after which it verifies clean and routes as before."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cit_registry.router import Router
from cit_registry.store import FORMAT_VERSION, Registry, TaskKey

FORMAT1 = Path(__file__).parent / "data" / "registry-format1"


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
