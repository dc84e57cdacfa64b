"""What a hostile bundle, a damaged file or a racing reader can do to the registry: each is refused or reported.
Synthetic keys and adapters (no model needed)."""
import io
import json
import shutil
import subprocess
import tarfile
import threading

import numpy as np
import pytest

from cit_registry import store
from cit_registry.router import Router, verify_index
from cit_registry.store import BackboneMismatch, BundleError, InvalidCard, Registry, TaskCard, TaskKey, validate_task_id

from .test_registry import make_key, write_adapter, write_lora


def add(reg, task_id, key=None, version=None, **card):
    version = version or (reg.versions(task_id) or [0])[-1] + 1
    return reg.commit(TaskCard(task_id, version, "eproj", {"action": "expanded"}, **card), key or make_key(),
                      {"adapter": write_adapter})


@pytest.fixture
def exported(tmp_path):
    src = Registry.open(tmp_path / "src", create=True)
    add(src, "alpha")
    return src, src.export_bundle("alpha", tmp_path / "alpha.tar")


def rewrite(bundle, out, change=None, extra=()):
    """A copy of a bundle with members changed by change(name, data) -> data, and extra (TarInfo, data) added."""
    with tarfile.open(bundle) as tar, tarfile.open(out, "w") as dst:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            data = change(m.name, data) if change else data
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
        for info, data in extra:
            dst.addfile(info, io.BytesIO(data))
    return out


def resigned(bundle, out, rel, new_data):
    """A bundle where one file was replaced and bundle.json's hash of it recomputed (what a forger does)."""
    import hashlib

    def change(name, data):
        if name == f"task/{rel}":
            return new_data
        if name == "bundle.json":
            meta = json.loads(data)
            meta["files"][rel] = hashlib.sha256(new_data).hexdigest()
            return json.dumps(meta).encode()
        return data
    return rewrite(bundle, out, change)


def test_task_ids_with_a_trailing_newline_are_refused():
    with pytest.raises(ValueError, match="invalid task id"):
        validate_task_id("alpha\n")


def test_a_sparse_member_is_refused_before_anything_is_allocated(tmp_path, exported):
    """10 KiB on disk claiming 2 GiB: refused from its header."""
    dst = Registry.open(tmp_path / "dst", create=True)
    work = tmp_path / "sparse"
    with tarfile.open(exported[1]) as tar:
        tar.extractall(work, filter="data")
    with open(work / "task" / "huge", "wb") as f:
        f.truncate(2 << 30)
    meta = json.loads((work / "bundle.json").read_text())
    meta["files"]["huge"] = "0" * 64
    (work / "bundle.json").write_text(json.dumps(meta))
    bundle = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "-cf", str(bundle), "-C", str(work), "bundle.json", "task"], check=True)
    assert bundle.stat().st_size < 1 << 20
    with pytest.raises(BundleError, match="sparse"):
        dst.import_bundle(bundle)
    assert dst.task_ids() == []


@pytest.mark.parametrize("limit, message", [("MAX_MEMBER_BYTES", "has .* bytes; the limit"),
                                            ("MAX_BUNDLE_BYTES", "its files hold"),
                                            ("MAX_BUNDLE_MEMBERS", "members")])
def test_bundles_beyond_the_size_and_count_limits_are_refused(tmp_path, exported, monkeypatch, limit, message):
    dst = Registry.open(tmp_path / "dst", create=True)
    monkeypatch.setattr(store, limit, 3)
    with pytest.raises(BundleError, match=message):
        dst.import_bundle(exported[1])
    assert dst.task_ids() == []


def test_a_listed_file_whose_name_leaves_the_bundle_is_refused(tmp_path, exported):
    """bundle.json itself names "../escape" (with its true hash): extraction would write beside the staging
    directory."""
    import hashlib

    dst = Registry.open(tmp_path / "dst", create=True)
    payload = b"planted"

    def list_it(name, data):
        if name == "bundle.json":
            meta = json.loads(data)
            meta["files"]["../../../escape"] = hashlib.sha256(payload).hexdigest()
            return json.dumps(meta).encode()
        return data
    info = tarfile.TarInfo("task/../../../escape")
    info.size = len(payload)
    bad = rewrite(exported[1], tmp_path / "bad.tar", list_it, extra=[(info, payload)])
    with pytest.raises(BundleError, match="not a plain file inside the bundle"):
        dst.import_bundle(bad)
    assert not list(tmp_path.rglob("escape")) and dst.task_ids() == []


def test_an_imported_card_must_match_the_card_schema(tmp_path, exported):
    dst = Registry.open(tmp_path / "dst", create=True)

    def wrong_type(name, data):
        if name == "task/task.json":
            card = json.loads(data)
            card["decision"] = "expanded"  # a string where every reader expects an object
            return json.dumps(card).encode()
        return data
    bad = resigned(exported[1], tmp_path / "bad.tar", "task.json",
                   wrong_type("task/task.json", (exported[0].get("alpha").path / "task.json").read_bytes()))
    with pytest.raises(BundleError, match="manifest|schema"):
        dst.import_bundle(bad)
    assert dst.task_ids() == []
    with pytest.raises(InvalidCard, match="decision"):
        TaskCard.from_json(wrong_type("task/task.json", (exported[0].get("alpha").path / "task.json").read_bytes()))


def test_a_bundle_resigned_after_tampering_disagrees_with_its_manifest(tmp_path, exported):
    dst = Registry.open(tmp_path / "dst", create=True)
    weights = (exported[0].get("alpha").adapter_dir / "adapter_model.safetensors").read_bytes()
    bad = resigned(exported[1], tmp_path / "bad.tar", "adapter/adapter_model.safetensors", weights[:-1] + b"X")
    with pytest.raises(BundleError, match="manifest"):
        dst.import_bundle(bad)
    assert dst.task_ids() == []


def test_a_bundle_from_another_backbone_is_refused_before_it_commits(tmp_path, exported):
    dst = Registry.open(tmp_path / "dst", create=True)
    wide = TaskKey.from_embeddings(np.ones((2, 128)), np.ones((2, 32)), np.ones((2, 32)))
    dst.commit(TaskCard("other", 1, "eproj", {"action": "expanded"}), wide,
               {"adapter": lambda d: write_adapter(d, feature_dim=128)})
    with pytest.raises(BackboneMismatch, match="key image is 64, the registry's is 128"):
        dst.import_bundle(exported[1])
    assert dst.task_ids() == ["other"] and list(dst.verify()) == []
    with pytest.raises(BackboneMismatch, match="trained on 'b', this registry's tasks on 'a'"):
        reg = Registry.open(tmp_path / "named", create=True)
        reg.commit(TaskCard("x", 1, "eproj", {}), make_key(), {"adapter": write_adapter}, backbone="a")
        reg.commit(TaskCard("y", 1, "eproj", {}), make_key(), {"adapter": write_adapter}, backbone="b")
    with pytest.raises(BackboneMismatch, match="LoRA on q_proj acts on"):
        reg.commit(TaskCard("l1", 1, "lora", {}), make_key(), {"adapter": write_adapter, "lora": write_lora})
        reg.commit(TaskCard("l2", 1, "lora", {}), make_key(),
                   {"adapter": write_adapter, "lora": lambda d: write_lora(d, hidden_size=32)})


def test_a_damaged_card_on_disk_leaves_its_task_out_and_verify_says_so(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    add(reg, "alpha")
    damaged = add(reg, "beta")
    card = json.loads((damaged.path / "task.json").read_text())
    card["metrics"] = {"accuracy_after": "high"}
    (damaged.path / "task.json").write_text(json.dumps(card))
    assert [t.task_id for t in reg.serving()] == ["alpha"]  # ListTasks and routing go on for the others
    problems = list(reg.verify())
    assert any("beta v1" in p and "schema" in p for p in problems), problems


def test_verify_reports_a_missing_manifest_and_export_refuses_a_damaged_version(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    t = add(reg, "alpha")
    (t.path / "manifest.json").unlink()
    assert list(reg.verify()) == ["alpha v1: missing manifest.json: its files cannot be checked"]
    u = add(reg, "beta")
    weights = u.adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"X")
    with pytest.raises(BundleError, match="damaged, not exported.*sha256 differs"):
        reg.export_bundle("beta", tmp_path / "beta.tar")
    assert not (tmp_path / "beta.tar").exists()


def test_the_index_is_labelled_with_what_was_read_before_its_keys(tmp_path):
    """A commit landing while the index is built makes it look stale (rebuilt), never fresh without the task."""
    reg = Registry.open(tmp_path / "reg", create=True)
    add(reg, "alpha")
    serving = reg.serving
    racing = lambda: (serving(), add(reg, "beta"))[0]  # noqa: E731 - a commit lands just after the keys are read
    reg.serving = racing
    with reg.writing():
        Router.build(reg).save(reg)
    reg.serving = serving
    assert len(Router.load(reg)) == 2, "the index claims to be fresh but misses the task committed meanwhile"


def test_a_torn_index_is_rebuilt_and_verify_reports_it(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    add(reg, "alpha")
    with reg.writing():
        Router.build(reg).save(reg)
    old = next((reg.root / "index").glob("keys-*.faiss")).read_bytes()
    add(reg, "beta")
    with reg.writing():
        Router.build(reg).save(reg)
    assert verify_index(reg) == []
    new = next((reg.root / "index").glob("keys-*.faiss"))
    new.write_bytes(old)  # index.json of the second build, keys of the first: a torn pair
    assert any("torn" in p for p in verify_index(reg)), verify_index(reg)
    assert len(Router.load(reg)) == 2 and verify_index(reg) == []
    # keys of the right count that are not the tasks' keys
    meta, _ = store.json.loads((reg.root / "index" / "index.json").read_text()), None
    forged = Router(np.ones((2, 96), np.float32) / np.sqrt(96) * np.sqrt(2), [tuple(r) for r in meta["rows"]],
                    meta["fingerprint"], generation=meta["generation"], floors=meta["floors"],
                    image_dim=meta["image_dim"])
    with reg.writing():
        forged.save(reg)
    assert verify_index(reg) == ["routing index keys differ from the task keys"]


def test_a_reader_never_writes_the_index_while_a_writer_holds_the_lock(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    add(reg, "alpha")
    shutil.rmtree(reg.root / "index", ignore_errors=True)
    with Registry.open(reg.root).writing():  # another writer, e.g. add-task, is at work
        assert len(Router.load(reg)) == 1  # routes ...
        assert not (reg.root / "index" / "index.json").exists()  # ... without racing the writer for the index
    Router.load(reg)
    assert verify_index(reg) == []


def test_every_commit_bumps_the_generation(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    assert reg.generation() == 0
    add(reg, "alpha")
    add(reg, "alpha")
    assert reg.generation() == 2
    with pytest.raises(BackboneMismatch):
        reg.commit(TaskCard("beta", 1, "eproj", {}), make_key(), {"adapter": lambda d: write_adapter(d, 8)})
    assert reg.generation() == 2  # a refused commit changes nothing


def test_concurrent_readers_see_generation_and_versions_move_together(tmp_path):
    """A reader that sees generation g sees at least g versions committed (the bump follows the rename)."""
    reg = Registry.open(tmp_path / "reg", create=True)
    done, seen = threading.Event(), []

    def read():
        reader = Registry.open(reg.root)
        while not done.is_set():
            g = reader.generation()
            seen.append((g, sum(len(reader.versions(t)) for t in reader.task_ids())))
    thread = threading.Thread(target=read)
    thread.start()
    for _ in range(20):
        add(reg, "alpha")
    done.set()
    thread.join()
    assert all(versions >= g for g, versions in seen)


def test_a_card_or_key_damaged_on_disk_in_any_way_leaves_only_its_own_task_out(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    for task in ("alpha", "beta", "gamma", "delta"):
        add(reg, task)
    beta, gamma, delta = (reg.get(t) for t in ("beta", "gamma", "delta"))
    (beta.path / "task.json").write_bytes(b"\xff\xfe not UTF-8")
    card = json.loads((gamma.path / "task.json").read_text())
    (gamma.path / "task.json").write_text(json.dumps({**card, "task_id": "Not A Task Id"}))
    (delta.path / "key.safetensors").write_bytes(b"garbage")
    assert [t.task_id for t in reg.serving()] == ["alpha", "delta"]
    assert [r[0] for r in Router.build(reg).rows] == ["alpha"]  # delta's key cannot be read: not routed
    assert {p.split(":")[0] for p in reg.verify()} == {"beta v1", "gamma v1", "delta v1"}


def test_threads_of_one_process_take_turns_at_the_write_lock(tmp_path):
    """The server's registry watcher and an admin reload share one Registry: only one writes the index."""
    reg = Registry.open(tmp_path / "reg", create=True)
    add(reg, "alpha")
    inside, release, seen = threading.Event(), threading.Event(), []

    def hold():
        with reg.writing():
            inside.set()
            release.wait(10)
    holder = threading.Thread(target=hold)
    holder.start()
    inside.wait(10)
    with reg.writing_if_free() as free:
        seen.append(free)
    release.set()
    holder.join()
    with reg.writing_if_free() as free:
        seen.append(free)
    assert seen == [False, True]


def _drop(name):
    return lambda member, data: None if member == name else data


def _meta(edit):
    def change(member, data):
        if member != "bundle.json":
            return data
        meta = json.loads(data)
        return json.dumps(edit(meta)).encode()
    return change


@pytest.mark.parametrize("change, message", [
    (lambda m, d: d if m != "bundle.json" else b"[1, 2]", "unsupported bundle format"),
    (_meta(lambda meta: {**meta, "format": 3}), "unsupported bundle format 3"),
    (_meta(lambda meta: {**meta, "files": list(meta["files"])}), "unsupported bundle format"),
    (_meta(lambda meta: {**meta, "backbone": "bb-1"}), "backbone record is not an object"),
    (_drop("task/task.json"), "'task.json' is missing or not a plain file"),
    (_drop("bundle.json"), "is not a task bundle"),
], ids=["not-an-object", "format-3", "files-not-an-object", "backbone-not-an-object", "listed-file-absent",
        "no-bundle-json"])
def test_a_bundle_json_that_does_not_describe_the_bundle_is_refused(tmp_path, exported, change, message):
    def rewrite_or_drop(bundle, out):
        with tarfile.open(bundle) as tar, tarfile.open(out, "w") as dst:
            for m in tar.getmembers():
                data = change(m.name, tar.extractfile(m).read())
                if data is not None:
                    m.size = len(data)
                    dst.addfile(m, io.BytesIO(data))
        return out
    dst = Registry.open(tmp_path / "dst", create=True)
    with pytest.raises(BundleError, match=message):
        dst.import_bundle(rewrite_or_drop(exported[1], tmp_path / "bad.tar"))
    assert dst.task_ids() == []


def test_a_bundle_exactly_at_the_limits_is_accepted(tmp_path, exported, monkeypatch):
    with tarfile.open(exported[1]) as tar:
        members = tar.getmembers()
    monkeypatch.setattr(store, "MAX_BUNDLE_MEMBERS", len(members))
    monkeypatch.setattr(store, "MAX_MEMBER_BYTES", max(m.size for m in members))
    monkeypatch.setattr(store, "MAX_BUNDLE_BYTES", sum(m.size for m in members))
    dst = Registry.open(tmp_path / "dst", create=True)
    assert dst.import_bundle(exported[1]).task_id == "alpha"


def test_verify_and_export_report_a_version_that_no_longer_fits_the_recorded_backbone(tmp_path):
    """The record says what every version must fit; a registry.json edited (or a version copied in) by hand
    is caught by verify, and export refuses to carry the misfit elsewhere."""
    reg = Registry.open(tmp_path / "reg", create=True)
    add(reg, "alpha")
    meta = json.loads((reg.root / "registry.json").read_text())
    meta["backbone"]["adapter"]["hidden_size"] += 1
    (reg.root / "registry.json").write_text(json.dumps(meta))
    assert [p for p in reg.verify() if "does not fit" in p] == [
        f"alpha v1: does not fit the registry's backbone: adapter hidden_size is "
        f"{meta['backbone']['adapter']['hidden_size'] - 1}, the registry's is {meta['backbone']['adapter']['hidden_size']}"]
    with pytest.raises(BundleError, match="does not fit the registry's backbone"):
        reg.export_bundle("alpha", tmp_path / "alpha.tar")
