"""The registry on disk and the FAISS router, with synthetic keys (no model needed)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from cit_registry.router import Candidate, Router, select, task_similarity
from cit_registry.store import Registry, TaskCard, TaskKey, TaskNotFound, routing_query, validate_task_id

rng = np.random.default_rng(0)


def make_key(image=None, instruction=None, n=20):
    image = rng.normal(size=(1, 64)) if image is None else image
    instruction = rng.normal(size=(1, 32)) if instruction is None else instruction
    return TaskKey.from_embeddings(
        image + 0.1 * rng.normal(size=(n, 64)), instruction + 0.1 * rng.normal(size=(n, 32)), rng.normal(size=(n, 32))
    )


def write_adapter(path):
    path.mkdir()
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"weights")


def add(reg, task_id, key, version=1):
    card = TaskCard(task_id=task_id, version=version, adapter_kind="eproj", decision={"action": "expanded"})
    return reg.commit(card, key, write_adapter)


def test_commit_is_whole_versioned_and_immutable(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    key = make_key()
    t = add(reg, "alpha", key)
    assert (t.task_id, t.version) == ("alpha", 1)
    assert np.allclose(t.key().image, key.image)
    with pytest.raises(ValueError, match="next version is 2"):
        add(reg, "alpha", key, version=1)  # never overwrites
    add(reg, "alpha", key, version=2)
    assert reg.get("alpha").version == 2 and reg.get("alpha", 1).version == 1
    assert not list((tmp_path / "reg" / ".staging").iterdir())
    assert list(reg.verify()) == []


def test_failed_write_leaves_no_trace(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)

    def broken(path):
        path.mkdir()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        reg.commit(TaskCard("beta", 1, "eproj", {}), make_key(), broken)
    assert reg.task_ids() == [] and not list((tmp_path / "reg" / ".staging").iterdir())


def test_a_lora_task_is_written_with_its_lora_and_verify_notices_a_missing_one(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    card = TaskCard("gamma", 1, "lora", {"action": "expanded"})
    with pytest.raises(ValueError, match="needs LoRA"):
        reg.commit(card, make_key(), write_adapter)
    with pytest.raises(ValueError, match="has no LoRA"):
        reg.commit(TaskCard("delta", 1, "eproj", {}), make_key(), write_adapter, write_adapter)
    t = reg.commit(card, make_key(), write_adapter, write_adapter)
    assert t.lora_dir == t.path / "lora" and (t.lora_dir / "adapter_model.safetensors").is_file()
    assert add(reg, "eps", make_key()).lora_dir is None
    assert list(reg.verify()) == []
    (t.lora_dir / "adapter_model.safetensors").unlink()
    assert list(reg.verify()) == ["gamma v1: missing lora/adapter_model.safetensors"]


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", "UPPER", ".hidden", "x" * 65, "a..b"])
def test_task_ids_cannot_escape_the_registry(bad):
    with pytest.raises(ValueError, match="invalid task id"):
        validate_task_id(bad)


def test_unknown_task_is_not_found(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    with pytest.raises(TaskNotFound):
        reg.get("nope")
    with pytest.raises(TaskNotFound):
        reg.get("../../etc")


def test_verify_reports_a_damaged_version(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    t = add(reg, "alpha", make_key())
    (t.path / "key.safetensors").write_bytes(b"garbage")
    problems = list(reg.verify())
    assert problems and "alpha v1" in problems[0]


def test_route_score_is_the_sum_of_the_two_cosines(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    keys = {name: make_key() for name in ("a", "b", "c")}
    for name, key in keys.items():
        add(reg, name, key)
    router = Router.build(reg)
    img, ins = rng.normal(size=(1, 64)), rng.normal(size=(1, 32))
    top = router.search(routing_query(img, ins), k=3)[0]
    cos = lambda u, v: float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))  # noqa: E731
    for c in top:
        expected = cos(img[0], keys[c.task_id].image[0]) + cos(ins[0], keys[c.task_id].instruction[0])
        assert c.score == pytest.approx(expected, abs=1e-5)
    assert [c.score for c in top] == sorted((c.score for c in top), reverse=True)


def test_router_finds_the_task_of_a_nearby_request(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    centres = {name: (rng.normal(size=(1, 64)), rng.normal(size=(1, 32))) for name in ("a", "b", "c", "d")}
    for name, (img, ins) in centres.items():
        add(reg, name, make_key(img, ins))
    router = Router.build(reg)
    for name, (img, ins) in centres.items():
        q = routing_query(img + 0.2 * rng.normal(size=img.shape), ins + 0.2 * rng.normal(size=ins.shape))
        assert router.search(q, k=1)[0][0].task_id == name


def test_merged_key_routes_both_centroids_to_one_task(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    first, second = make_key(), make_key()
    add(reg, "a", first.merged(second))
    add(reg, "b", make_key())
    top = Router.build(reg).search(second.routing_vectors, k=2)[0]
    assert top[0].task_id == "a" and len({c.task_id for c in top}) == len(top)


def test_index_is_persisted_and_rebuilt_when_stale(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    add(reg, "a", make_key())
    Router.load(reg)
    meta = json.loads((tmp_path / "reg" / "index" / "index.json").read_text())
    assert meta["fingerprint"] == [["a", 1]]
    add(reg, "b", make_key())
    assert len(Router.load(reg)) == 2  # stale index noticed and rebuilt
    (tmp_path / "reg" / "index" / "keys.faiss").write_bytes(b"corrupt")
    (tmp_path / "reg" / "index" / "index.json").write_text("{")
    assert len(Router.load(reg)) == 2  # unreadable index is derived state: rebuilt


def test_select_serves_the_best_task_only_at_or_above_the_threshold():
    ranked = [Candidate("a", 2, 1.4), Candidate("b", 1, 0.9)]
    assert select(ranked, 1.4) == ranked[0]
    assert select(ranked, 1.41) is None  # the base connector answers
    assert select([], -2.0) is None


def test_similarity_is_one_for_identical_tasks_and_symmetric():
    a, b = make_key(), make_key()
    assert task_similarity(a, a)["score"] == pytest.approx(1.0, abs=1e-5)
    assert task_similarity(a, b)["score"] == pytest.approx(task_similarity(b, a)["score"])


def test_registry_listing_does_not_import_torch(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    add(reg, "a", make_key())
    code = (
        "import sys\nfrom cit_registry.cli import app\n"
        "try:\n    app(['list', '--registry', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'cit-registry list imported torch'\nprint('OK')"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "reg")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "a" in out.stdout and "OK" in out.stdout
