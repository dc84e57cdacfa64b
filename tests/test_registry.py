"""The registry on disk and the FAISS router, with synthetic keys (no model needed)."""
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from cit_registry.router import BACKGROUND, FallBack, Router, task_similarity, verify_index
from cit_registry.store import (
    DEFAULT_IMAGE_FLOOR,
    DEFAULT_INSTRUCTION_FLOOR,
    IMAGE_SLACK,
    INSTRUCTION_SLACK,
    Registry,
    TaskCard,
    TaskKey,
    TaskNotFound,
    routing_query,
    validate_task_id,
)

rng = np.random.default_rng(0)


def make_key(image=None, instruction=None, n=20):
    image = rng.normal(size=(1, 64)) if image is None else image
    instruction = rng.normal(size=(1, 32)) if instruction is None else instruction
    return TaskKey.from_embeddings(
        image + 0.1 * rng.normal(size=(n, 64)), instruction + 0.1 * rng.normal(size=(n, 32)), rng.normal(size=(n, 32))
    )


def write_adapter(path, feature_dim=64, hidden_size=16):
    """A small projection in the connector's format (feature_dim -> hidden_size): the registry reads its widths."""
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"adapter_type": "eproj", "feature_dim": feature_dim,
                                                          "hidden_size": hidden_size, "num_tokens": 1,
                                                          "projector": "linear"}))
    save_file({"proj.weight": np.zeros((hidden_size, feature_dim), np.float32)}, str(path / "adapter_model.safetensors"))


def write_lora(path, hidden_size=16, rank=2):
    """A small LoRA in PEFT's format on q_proj of an LM of width hidden_size."""
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "target_modules": ["q_proj"],
                                                          "base_model_name_or_path": "tiny-lm"}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": np.zeros((rank, hidden_size), np.float32),
               f"{prefix}.lora_B.weight": np.zeros((hidden_size, rank), np.float32)},
              str(path / "adapter_model.safetensors"))


def add(reg, task_id, key, version=1):
    card = TaskCard(task_id=task_id, version=version, adapter_kind="eproj", decision={"action": "expanded"})
    return reg.commit(card, key, {"adapter": write_adapter})


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
        reg.commit(TaskCard("beta", 1, "eproj", {}), make_key(), {"adapter": broken})
    assert reg.task_ids() == [] and not list((tmp_path / "reg" / ".staging").iterdir())


def test_a_lora_task_is_written_with_its_lora_and_verify_notices_a_missing_one(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    card = TaskCard("gamma", 1, "lora", {"action": "expanded"})
    with pytest.raises(ValueError, match="written as parts adapter, lora, not adapter"):
        reg.commit(card, make_key(), {"adapter": write_adapter})
    with pytest.raises(ValueError, match="written as parts adapter, not adapter, lora"):
        reg.commit(TaskCard("delta", 1, "eproj", {}), make_key(), {"adapter": write_adapter, "lora": write_lora})
    t = reg.commit(card, make_key(), {"adapter": write_adapter, "lora": write_lora})
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
    keys = next((tmp_path / "reg" / "index").glob("keys-*.faiss"))
    keys.write_bytes(b"corrupt")
    assert len(Router.load(reg)) == 2  # an unreadable keys file: rebuilt
    (tmp_path / "reg" / "index" / "index.json").write_text("{")
    assert len(Router.load(reg)) == 2  # unreadable index is derived state: rebuilt


def test_a_refreshed_router_reads_only_new_keys_and_equals_a_build(tmp_path, monkeypatch):
    reg = Registry.open(tmp_path / "reg", create=True)
    for name in ("a", "b", "c"):
        add(reg, name, make_key())
    add(reg, "m", make_key().merged(make_key()))  # two centroids
    old = Router.build(reg)
    add(reg, "b", make_key(), version=2)  # a new version replaces b's rows
    add(reg, "d", make_key())
    read = []
    load = TaskKey.load
    monkeypatch.setattr(TaskKey, "load", staticmethod(lambda path: read.append(path.parent.name) or load(path)))
    new = old.refreshed(reg)
    assert sorted(read) == ["v0001", "v0002"]  # b v2 and d v1: the kept tasks' keys are not read again
    built = Router.build(reg)
    assert new.rows == built.rows and new.fingerprint == built.fingerprint and new.generation == built.generation
    assert np.allclose(new.floors, built.floors) and new.image_dim == built.image_dim
    assert np.allclose(new.index.reconstruct_n(0, new.index.ntotal), built.index.reconstruct_n(0, built.index.ntotal))
    # and from an empty router (the first task of a registry) too
    empty = Router.build(Registry.open(tmp_path / "empty", create=True))
    assert empty.refreshed(reg).rows == built.rows


def axis(i, dim):
    v = np.zeros((1, dim), np.float32)
    v[0, i] = 1
    return v


def floored(image, instruction, image_floor=0.5, instruction_floor=0.5):
    """A one-centroid key with the floors given (from_embeddings would measure them)."""
    key = TaskKey.from_embeddings(image, instruction, instruction)
    return TaskKey(key.image, key.instruction, key.output, key.counts,
                   np.array([[image_floor, instruction_floor]], np.float32))


def mix(*weighted):
    v = sum(w * x for w, x in weighted)
    return v / np.linalg.norm(v)


@pytest.fixture
def two_questions_one_image(tmp_path):
    """Tasks "what" and "colour" ask different questions of the same images (axis 0); "other" asks about other
    images (axis 1). Instructions live on axes 0-3 of an 8-d text space; axis 7 is a background question."""
    reg = Registry.open(tmp_path / "reg", create=True)
    add(reg, "what", floored(axis(0, 64), axis(0, 8)))
    add(reg, "colour", floored(axis(0, 64), axis(1, 8)))
    add(reg, "other", floored(axis(1, 64), axis(2, 8)))
    return Router.build(reg)


def route(router, image, instruction, background=None, margin=0.0):
    background = np.zeros((0, 8), np.float32) if background is None else background
    return router.route(routing_query(image, instruction), background, margin)[0]


def test_a_request_like_a_tasks_images_and_wordings_routes_to_it(two_questions_one_image):
    r = route(two_questions_one_image, axis(0, 64), mix((0.8, axis(0, 8)), (0.6, axis(3, 8))))  # cos 0.8 > floor
    assert r.chosen.task_id == "what" and r.fell_back is None
    assert r.chosen.image == pytest.approx(1) and r.chosen.instruction == pytest.approx(0.8)
    assert route(two_questions_one_image, axis(0, 64), axis(1, 8)).chosen.task_id == "colour"


def test_an_image_below_every_floor_falls_back_even_with_a_tasks_own_wording(two_questions_one_image):
    r = route(two_questions_one_image, mix((0.4, axis(0, 64)), (0.9165, axis(5, 64))), axis(0, 8))  # image cos 0.4
    assert r.chosen is None and r.fell_back is FallBack.IMAGE_UNLIKE
    assert r.candidates[0].task_id == "what" and r.candidates[0].score == pytest.approx(1.4, abs=1e-4)
    near = mix((0.55, axis(0, 64)), (0.835, axis(5, 64)))  # image cos 0.55: above the floor, not by 0.1
    assert route(two_questions_one_image, near, axis(0, 8)).chosen.task_id == "what"
    assert route(two_questions_one_image, near, axis(0, 8), margin=0.1).fell_back is FallBack.IMAGE_UNLIKE


def test_a_new_question_over_familiar_images_falls_back(two_questions_one_image):
    r = route(two_questions_one_image, axis(0, 64), mix((0.45, axis(0, 8)), (0.893, axis(3, 8))))  # cos 0.45
    assert r.chosen is None and r.fell_back is FallBack.INSTRUCTION_UNLIKE
    # the margin moves every task's floors alike: at -0.1 the same request clears 0.5 - 0.1
    assert route(two_questions_one_image, axis(0, 64), mix((0.45, axis(0, 8)), (0.893, axis(3, 8))),
                 margin=-0.1).chosen.task_id == "what"


def test_an_instruction_nearer_another_tasks_question_is_not_this_tasks(two_questions_one_image):
    # "what"'s images, asked halfway between "what" (0.6) and "other" (0.8): it clears "what"'s floors, but it asks
    # what "other" asks, of images "other" does not take
    r = route(two_questions_one_image, axis(0, 64), mix((0.6, axis(0, 8)), (0.8, axis(2, 8))))
    assert r.chosen is None and r.fell_back is FallBack.NEARER_OTHER_QUESTION and r.nearer == "other"


def test_tasks_asking_one_question_of_different_images_do_not_block_each_other(tmp_path):
    """"handwritten" and "printed" ask the same question (their instruction centroids 0.99 apart, inside each
    other's floors) of different images: each request goes to the task whose images it shows, even when its
    wording is a little nearer the other task's centroid."""
    reg = Registry.open(tmp_path / "reg", create=True)
    add(reg, "handwritten", floored(axis(0, 64), mix((0.99, axis(0, 8)), (0.14, axis(3, 8)))))
    add(reg, "printed", floored(axis(1, 64), axis(0, 8)))
    router = Router.build(reg)
    for image, task in ((axis(0, 64), "handwritten"), (axis(1, 64), "printed")):
        r = route(router, image, axis(0, 8))
        assert r.fell_back is None and r.chosen.task_id == task


def test_background_questions_count_against_a_task_only_outside_its_own_floor(two_questions_one_image):
    instruction = mix((0.6, axis(0, 8)), (0.8, axis(7, 8)))
    assert route(two_questions_one_image, axis(0, 64), instruction).chosen.task_id == "what"
    r = route(two_questions_one_image, axis(0, 64), instruction, background=axis(7, 8))
    assert r.chosen is None and r.fell_back is FallBack.NEARER_OTHER_QUESTION and r.nearer == BACKGROUND
    # a background question the task itself asks (within its instruction floor) is the task's own
    own = mix((0.9, axis(0, 8)), (0.436, axis(7, 8)))
    assert route(two_questions_one_image, axis(0, 64), own, background=own).chosen.task_id == "what"


def test_no_tasks_falls_back_with_its_own_reason(tmp_path):
    router = Router.build(Registry.open(tmp_path / "reg", create=True))
    r = router.route(routing_query(axis(0, 64), axis(0, 8)), np.ones((3, 8)))[0]  # an empty index knows no dims
    assert r.chosen is None and r.fell_back is FallBack.NO_TASKS and r.candidates == []


def test_floors_are_measured_on_the_tasks_own_data():
    words = np.concatenate([axis(0, 8), axis(1, 8), mix((1, axis(0, 8)), (1, axis(1, 8)))])
    key = TaskKey.from_embeddings(np.ones((3, 4)), np.repeat(words, 4, axis=0), np.ones((12, 8)))
    # leave one wording out: each wording against the mean of the other two; the lowest counts
    expected = min(float(w @ (t := (words.sum(0) - w)) / np.linalg.norm(t)) for w in words) - INSTRUCTION_SLACK
    assert key.routing_floors[0, 1] == pytest.approx(expected)
    assert key.routing_floors[0, 0] == pytest.approx(1 - IMAGE_SLACK)  # identical images: only their like
    spread = rng.normal(size=(200, 16))
    unit = spread / np.linalg.norm(spread, axis=1, keepdims=True)
    cos = unit @ (unit.mean(0) / np.linalg.norm(unit.mean(0)))
    assert TaskKey.from_embeddings(spread, words[:1].repeat(200, 0), spread).routing_floors[0, 0] == \
        pytest.approx(np.percentile(cos, 1) - IMAGE_SLACK, abs=1e-5)
    one_wording = TaskKey.from_embeddings(np.ones((3, 4)), np.ones((3, 8)), np.ones((3, 8)))
    assert one_wording.routing_floors[0, 1] == DEFAULT_INSTRUCTION_FLOOR


def test_a_key_written_without_floors_routes_with_the_defaults(tmp_path):
    key = make_key()
    path = tmp_path / "key.safetensors"
    save_file({n: np.ascontiguousarray(getattr(key, n)) for n in ("image", "instruction", "output", "counts")},
              str(path))  # the key file of a cit before floors
    assert TaskKey.load(path).routing_floors.tolist() == [[DEFAULT_IMAGE_FLOOR, DEFAULT_INSTRUCTION_FLOOR]]
    merged = TaskKey.load(path).merged(floored(key.image, key.instruction, 0.2, 0.3))
    assert np.allclose(merged.routing_floors, [[DEFAULT_IMAGE_FLOOR, DEFAULT_INSTRUCTION_FLOOR], [0.2, 0.3]])


def test_the_persisted_index_keeps_each_rows_floors(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    add(reg, "a", floored(axis(0, 64), axis(0, 8), 0.2, 0.7))
    Router.load(reg)  # builds and persists
    loaded = Router.load(reg)
    assert np.allclose(loaded.floors, [[0.2, 0.7]]) and loaded.image_dim == 64
    c = loaded.search(routing_query(axis(0, 64), axis(0, 8)))[0][0]
    assert (c.image_floor, c.instruction_floor) == pytest.approx((0.2, 0.7))
    meta_path = tmp_path / "reg" / "index" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "floors": [[0.2, 0.1]]}))
    assert verify_index(reg) == ["routing index floors differ from the task keys"]
    add(reg, "b", floored(axis(1, 64), axis(1, 8), float("nan"), 0.7))  # a key no rule could route by
    assert "b v1: key floors are not one finite (image, instruction) pair per centroid" in list(reg.verify())


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


def test_verify_proves_versions_unchanged_with_their_manifest(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    t = add(reg, "alpha", make_key())
    manifest = json.loads((t.path / "manifest.json").read_text())["files"]
    assert set(manifest) == {"task.json", "key.safetensors", "adapter/adapter_config.json",
                             "adapter/adapter_model.safetensors"}
    assert list(reg.verify()) == []
    weights = t.adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(b"weightz")  # one byte changed
    (t.path / "adapter" / "extra.bin").write_bytes(b"?")
    assert list(reg.verify()) == ["alpha v1: adapter/adapter_model.safetensors changed since it was written (sha256 differs)",
                                  "alpha v1: unlisted file adapter/extra.bin",
                                  "alpha v1: adapter/extra.bin is not one of the part's files (adapter_config.json, "
                                  "adapter_model.safetensors)"]


def test_one_writer_at_a_time_and_a_dead_writers_leftovers_are_removed(tmp_path):
    import os

    from cit_registry.store import RegistryLocked

    reg = Registry.open(tmp_path / "reg", create=True)
    orphan = tmp_path / "reg" / ".staging" / "alpha-v0001-dead"
    orphan.mkdir(parents=True)
    with reg.writing():
        assert not orphan.exists()
        with reg.writing():  # re-entrant for the holder: commit inside add-task's lock
            add(reg, "alpha", make_key())
        other = Registry.open(tmp_path / "reg")
        with pytest.raises(RegistryLocked, match=f"another process \\(pid {os.getpid()}\\)"):
            with other.writing():
                pass
        with pytest.raises(RegistryLocked):
            add(other, "beta", make_key())
    add(other, "beta", make_key())  # released
    assert reg.task_ids() == ["alpha", "beta"]


def test_a_writer_in_another_process_blocks_this_one(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cit_registry.store import Registry; "
         f"r = Registry.open({str(tmp_path / 'reg')!r}); cm = r.writing(); cm.__enter__(); print('held', flush=True); "
         "time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from cit_registry.store import RegistryLocked

        with pytest.raises(RegistryLocked, match=f"pid {holder.pid}"):
            add(reg, "alpha", make_key())
    finally:
        holder.kill()
        holder.wait()
    add(reg, "alpha", make_key())  # a killed holder's lock is gone with its process


def test_a_task_moves_between_registries_as_a_checked_bundle(tmp_path):
    import tarfile

    from cit_registry.store import BundleError

    src = Registry.open(tmp_path / "a", create=True)
    t = add(src, "alpha", make_key())
    bundle = src.export_bundle("alpha", tmp_path / "alpha.tar")
    dst = Registry.open(tmp_path / "b", create=True)
    add(dst, "alpha", make_key())  # the target already has alpha v1: the import becomes v2
    moved = dst.import_bundle(bundle)
    assert (moved.task_id, moved.version) == ("alpha", 2)
    assert moved.card.decision["imported_from"]["version"] == 1 and moved.card.decision["action"] == "expanded"
    for rel in ("key.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (moved.path / rel).read_bytes() == (t.path / rel).read_bytes()
    assert list(dst.verify()) == []

    # Tampered with: one byte of the weights differs from the sha256 in bundle.json.
    bad = tmp_path / "bad.tar"
    with tarfile.open(bundle) as tar, tarfile.open(bad, "w") as out:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            if m.name.endswith("adapter_model.safetensors"):
                data = data[:-1] + b"X"
            m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        dst.import_bundle(bad)
    # A member outside the listed files (e.g. a path escaping the registry) is refused before anything is read.
    evil = tmp_path / "evil.tar"
    with tarfile.open(bundle) as tar, tarfile.open(evil, "w") as out:
        for m in tar.getmembers():
            out.addfile(m, tar.extractfile(m))
        info = tarfile.TarInfo("../../escape")
        info.size = 0
        out.addfile(info, io.BytesIO(b""))
    with pytest.raises(BundleError, match="not listed"):
        dst.import_bundle(evil)
    with pytest.raises(BundleError, match="not a readable task bundle"):
        (tmp_path / "junk.tar").write_bytes(b"junk" * 100)
        dst.import_bundle(tmp_path / "junk.tar")
    assert dst.fingerprint() == [["alpha", 2]] and list(dst.verify()) == []


def test_registry_cli_exports_and_imports_a_task(tmp_path):
    src = Registry.open(tmp_path / "a", create=True)
    add(src, "alpha", make_key())
    run = lambda *args: subprocess.run(["cit-registry", *args], capture_output=True, text=True)  # noqa: E731
    out = run("export", "alpha", "--out", str(tmp_path / "alpha.tar"), "--registry", str(tmp_path / "a"))
    assert out.returncode == 0, out.stdout + out.stderr
    out = run("import", str(tmp_path / "alpha.tar"), "--name", "copied", "--registry", str(tmp_path / "b"))
    assert out.returncode == 0 and "imported copied v1 (eproj)" in out.stdout, out.stdout + out.stderr
    assert run("verify", "--registry", str(tmp_path / "b")).returncode == 0  # store and routing index agree
    (tmp_path / "junk.tar").write_bytes(b"junk")
    out = run("import", str(tmp_path / "junk.tar"), "--registry", str(tmp_path / "b"))
    assert out.returncode == 2 and "not a readable task bundle" in out.stdout


def test_kill_9_during_commits_leaves_whole_versions_and_earlier_ones_byte_identical():
    """The fast version of scripts/registry_faults.py (its long run is in docs/USAGE.md)."""
    script = Path(__file__).parents[1] / "scripts" / "registry_faults.py"
    out = subprocess.run([sys.executable, str(script), "--kills", "20"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "20 kills" in out.stdout and "verify clean after every kill" in out.stdout


def test_every_crash_state_of_a_commit_is_the_registry_before_or_after_it():
    """Power loss, not process death: scripts/crash_states.py enumerates the crash states POSIX allows during a
    commit, and shows that each of the commit's fsyncs is needed (skipping any one breaks some state)."""
    script = Path(__file__).parents[1] / "scripts" / "crash_states.py"
    out = subprocess.run([sys.executable, str(script), "--drop-each-fsync"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("every one breaks some crash state") == 3, out.stdout


def test_a_reader_never_sees_a_torn_version_while_a_writer_commits(tmp_path):
    """Readers (the server) list and read versions while another process commits: every version a reader can see
    is whole and matches its manifest."""
    reg = Registry.open(tmp_path / "reg", create=True)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, numpy as np\n"
        "from cit_registry.store import Registry, TaskCard, TaskKey\n"
        "reg = Registry.open(sys.argv[1])\n"
        "rng = np.random.default_rng(0)\n"
        "def adapter(p):\n"
        "    p.mkdir(); (p / 'adapter_config.json').write_text('{}')\n"
        "    (p / 'adapter_model.safetensors').write_bytes(rng.bytes(1 << 18))\n"
        "for v in range(1, 41):\n"
        "    key = TaskKey.from_embeddings(rng.normal(size=(2, 8)), rng.normal(size=(2, 4)), rng.normal(size=(2, 4)))\n"
        "    reg.commit(TaskCard('t', v, 'eproj', {}), key, {'adapter': adapter})\n"), str(tmp_path / "reg")])
    seen = set()
    while True:
        finished = writer.poll() is not None  # read once more after the writer ends
        for t in reg.serving():
            seen.add(t.version)
            manifest = json.loads((t.path / "manifest.json").read_text())["files"]
            for rel, digest in manifest.items():
                assert hashlib.sha256((t.path / rel).read_bytes()).hexdigest() == digest, (t.version, rel)
        if finished:
            break
    assert writer.wait() == 0 and reg.get("t").version == 40 and len(seen) > 1


def test_a_large_registry_routes_through_the_approximate_index_with_exact_scores(tmp_path):
    import faiss

    rng = np.random.default_rng(3)
    n, limit = 6000, 5000  # the limit is lowered for speed; bench/faiss_routing.py measures the real sizes
    # like real routing keys: a unit image part and a unit instruction part
    vectors = routing_query(rng.normal(size=(n, 48)), rng.normal(size=(n, 16)))
    router = Router(vectors, [(f"t{i}", 1) for i in range(n)], fingerprint=[], exact_limit=limit, image_dim=48)
    assert isinstance(router.index, faiss.IndexRefine)
    queries = routing_query(vectors[:200, :48] + 0.1 * rng.normal(size=(200, 48)),
                            vectors[:200, 48:] + 0.1 * rng.normal(size=(200, 16)))
    exact = faiss.IndexFlatIP(64)
    exact.add(vectors)
    truth = exact.search(queries, 1)[1][:, 0]
    found = router.search(queries, k=3)
    recall = np.mean([c[0].task_id == f"t{t}" for c, t in zip(found, truth)])
    assert recall >= 0.95, recall
    for q, candidates in zip(queries, found):  # scores are inner products of the full keys, as the exact index gives
        rows = [int(c.task_id[1:]) for c in candidates]
        np.testing.assert_allclose([c.score for c in candidates], vectors[rows] @ q, atol=1e-4)
        np.testing.assert_allclose([(c.image, c.instruction) for c in candidates],  # the parts, from the full keys
                                   np.stack([vectors[rows, :48] @ q[:48], vectors[rows, 48:] @ q[48:]], 1), atol=1e-4)
    # persisted and read back (an empty registry's fingerprint matches this router's)
    reg = Registry.open(tmp_path / "reg", create=True)
    router.save(reg)
    loaded = Router.load(reg)
    assert isinstance(loaded.index, faiss.IndexRefine)
    assert [[(c.task_id, c.score) for c in r] for r in loaded.search(queries[:20], k=3)] == \
        [[(c.task_id, c.score) for c in r] for r in found[:20]]
    small = Router(vectors[:limit], [(f"t{i}", 1) for i in range(limit)], fingerprint=[], exact_limit=limit)
    assert isinstance(small.index, faiss.IndexFlatIP)
    with pytest.raises(ValueError, match="one norm"):
        Router(vectors * rng.uniform(0.5, 1, size=(n, 1)).astype(np.float32), [(f"t{i}", 1) for i in range(n)],
               fingerprint=[], exact_limit=limit)
